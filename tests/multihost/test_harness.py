"""The harness's own guard: one multi-host run at a time on a machine (no root or namespaces needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.multihost import netns


def test_a_second_run_waits_for_the_lock_then_says_who_holds_it(tmp_path) -> None:
    lock = str(tmp_path / "hwmh.lock")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from tests.multihost import netns
        with netns.exclusive(5, {lock!r}):
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=f"pid {holder.pid}"):
            with netns.exclusive(0.5, lock):
                pass
    finally:
        holder.stdin.close()
        holder.wait(10)
    with netns.exclusive(5, lock) as waited:  # released when its holder ended
        assert waited < 5
