"""package headwise.v1 of proto/ (generated stubs)."""
