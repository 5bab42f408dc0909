"""Local cluster launcher, serve config and the `headwise` command line."""
