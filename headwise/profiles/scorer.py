"""A scorer distilled from KVzip (KVzap, arXiv 2601.07891; Fast KVzip, arXiv 2601.17668).

For each layer a small map from features of a token that the prefill computes anyway
(`Capture(hidden=True)`): the layer's normed input hidden state x_t, the token's place in the
segment, and the norms of its key and value rows in every KV head, to log of KVzip's
reconstruction score of the token's row in every KV head: a linear map
`log s[h, t] ~ [f_t, 1] @ W_l[:, h]`, plus (format 3, `hidden_units` M > 0) one hidden layer of
M ReLU units beside it, `+ relu([f_t, 1] @ A_l) @ B_l[:, h]`.
Log scores keep the per-layer fits on one scale, so the predictions can be ranked over all
layers and heads at once, as `kvzip` ranks its scores.

Trained once per model by ridge regression on KVzip's own scores (`ModelRunner`'s
reconstruction pass) over standard-library docstrings (`texts.py`), accumulated as
per-layer normal equations, so memory does not grow with the text. Stored like the head
profiles: a safetensors file keyed by the weights' hash in the profile directory, or
shipped in the package (`profiles/data/`) for the default model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from headwise.errors import InvalidInput

SCORER_VERSION = 3  # what `save` writes: 3 = 2 + an optional hidden layer beside the linear map
READABLE_VERSIONS = (2, 3)  # 1: hidden state only (read no more: train again); 2: the linear map alone
FEATURES = ("position", "key_norm", "value_norm")  # beside the hidden state; what `train_scorer` fits
KNOWN_FEATURES = ("position", "key_norm", "value_norm")
LOG_FLOOR = 1e-6  # scores below this are one class for the fit: log(1e-6) ~ -13.8
SKIP_SINKS, SKIP_WINDOW = 4, 8  # rows kvzap always keeps; they would dominate the regression
TRAIN_DOCS, HELDOUT_DOCS = 40, 8  # the shipped scorer's
RIDGE = 1e-3  # ridge strength relative to the mean diagonal of X^T X
OBJECTIVES = ("ridge", "cutoffs")
OBJECTIVE = "ridge"  # the shipped scorer's fit
CUTOFFS = (0.5, 0.25, 0.1, 0.05)  # kept fractions whose global cutoffs the "cutoffs" fit separates
TEMPERATURE = 1.0  # of the logistic at each cutoff, in log-score units
MSE_WEIGHT = 0.1  # the squared error to the log score (raised to the kept-0.5 cutoff) beside the logistic terms
FIT_ITERATIONS = 60  # L-BFGS iterations per layer
HIDDEN_UNITS = 0  # the shipped scorer's hidden layer (0: the linear map alone)
HIDDEN_INPUTS = ("prediction", "features")  # what the hidden layer is fitted on (see `fit_on_prediction`)
MLP_ITERATIONS = 100  # L-BFGS iterations per layer of the hidden-layer fit
PACKAGED = Path(__file__).parent / "data"

Progress = Callable[[str, float], None]


def position_features(S: int, device=None) -> Tensor:
    """The place of each of a segment's S rows: log(1 + t), t / S, log(1 + S - t), 1 / (1 + t). [S, 4]."""
    t = torch.arange(S, dtype=torch.float32, device=device)
    return torch.stack([torch.log1p(t), t / S, torch.log1p(S - t), 1 / (1 + t)], 1)


def _norms(rows: Tensor) -> Tensor:
    """[Hkv, S, d] -> [S, 2 Hkv]: each head's row norm and its log."""
    n = rows.float().norm(dim=-1).T
    return torch.cat([n, n.clamp_min(1e-6).log()], 1)


def features(state, names: tuple[str, ...]) -> Tensor:
    """A layer's per-token inputs of the scorer: [S, D + extras] fp32 (hidden state first)."""
    x = state.hidden.float()
    parts = [x]
    for name in names:
        if name == "position":
            parts.append(position_features(x.shape[0], x.device))
        elif name == "key_norm":
            parts.append(_norms(state.keys).to(x.device))
        elif name == "value_norm":
            parts.append(_norms(state.values).to(x.device))
        else:
            raise InvalidInput(f"kvzap scorer feature {name!r} is not one of {KNOWN_FEATURES}")
    return torch.cat(parts, 1)


def num_features(hidden_size: int, num_kv_heads: int, names: tuple[str, ...]) -> int:
    return hidden_size + sum({"position": 4, "key_norm": 2 * num_kv_heads, "value_norm": 2 * num_kv_heads}[n] for n in names)


@dataclass
class KVScorer:
    """Per-layer maps over `features(state, self.features)` (F = hidden size + the extras; the last
    input row of each matrix is the bias). weight: [L, F + 1, Hkv] fp32, the linear map; hidden_in
    [L, F + 1, M] and hidden_out [L, M, Hkv], the optional hidden layer (None: the linear map alone):
    prediction = [f, 1] @ weight + relu([f, 1] @ hidden_in) @ hidden_out."""

    model_id: str
    weight: Tensor
    training: dict = field(default_factory=dict)
    features: tuple[str, ...] = FEATURES
    version: int = SCORER_VERSION
    hidden_in: Tensor | None = None
    hidden_out: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.hidden_in is None) != (self.hidden_out is None):
            raise InvalidInput("kvzap scorer: a hidden layer needs both its input and its output matrix")
        if self.hidden_in is not None:
            L, F1, H = self.weight.shape
            M = self.hidden_in.shape[-1]
            if tuple(self.hidden_in.shape) != (L, F1, M) or tuple(self.hidden_out.shape) != (L, M, H):
                raise InvalidInput(f"kvzap scorer: hidden layer of shape {tuple(self.hidden_in.shape)} / "
                                   f"{tuple(self.hidden_out.shape)} does not fit the linear map {tuple(self.weight.shape)}")

    @property
    def hidden_units(self) -> int:
        return 0 if self.hidden_in is None else self.hidden_in.shape[-1]

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1] - 1 - (num_features(0, self.num_kv_heads, self.features))

    @property
    def num_kv_heads(self) -> int:
        return self.weight.shape[2]

    def check_model(self, model_id: str) -> "KVScorer":
        if self.model_id != model_id:
            raise InvalidInput(
                f"kvzap scorer was trained for model {self.model_id[:16]}, not for model {model_id[:16]}; "
                f"train one for this model with `headwise scorer train --model PATH`"
            )
        return self

    def check_shape(self, num_layers: int, num_kv_heads: int, hidden_size: int) -> "KVScorer":
        if (self.num_layers, self.num_kv_heads, self.hidden_size) != (num_layers, num_kv_heads, hidden_size):
            raise InvalidInput(
                f"kvzap scorer of model {self.model_id[:16]} has {self.num_layers} layers x {self.num_kv_heads} KV heads "
                f"x hidden {self.hidden_size}, the model has {num_layers} x {num_kv_heads} x {hidden_size}; "
                f"train one for this model with `headwise scorer train --model PATH`"
            )
        return self

    def predict(self, state) -> Tensor:
        """A layer's state (hidden [S, D], keys and values [Hkv, S, d]) -> [Hkv, S] predicted log KVzip score."""
        f = features(state, self.features)
        w = self.weight[state.layer].to(f.device)  # [F + 1, Hkv]
        out = torch.addmm(w[-1], f, w[:-1])
        if self.hidden_in is not None:
            a = self.hidden_in[state.layer].to(f.device)  # [F + 1, M]
            out = out + torch.addmm(a[-1], f, a[:-1]).relu_() @ self.hidden_out[state.layer].to(f.device)
        return out.T

    # ---- storage ------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        meta = {"model_id": self.model_id, "version": str(SCORER_VERSION), "training": json.dumps(self.training),
                "features": json.dumps(list(self.features)), "hidden_units": str(self.hidden_units)}
        tensors = {"weight": self.weight.contiguous()}
        if self.hidden_in is not None:
            tensors |= {"hidden_in": self.hidden_in.contiguous(), "hidden_out": self.hidden_out.contiguous()}
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # atomic: a reader never sees half a scorer
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KVScorer":
        from safetensors import safe_open

        p = Path(path).expanduser()
        if not p.is_file():
            raise InvalidInput(f"no kvzap scorer at {str(p)!r}; train one with `headwise scorer train --model PATH`")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or foreign file: say which file, not the parser's class name
            raise InvalidInput(f"kvzap scorer at {str(p)!r} is unreadable ({e}); train it again") from None
        if meta.get("version") not in {str(v) for v in READABLE_VERSIONS}:
            raise InvalidInput(
                f"kvzap scorer at {str(p)!r} has format version {meta.get('version')!r}; this headwise reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (hidden state, place and key/value norms; 3: and a hidden layer); "
                f"train it again with `headwise scorer train --force`"
            )
        if "weight" not in tensors:
            raise InvalidInput(f"kvzap scorer at {str(p)!r} has no linear map ('weight'); train it again")
        units = int(meta.get("hidden_units", "0") or 0) if meta["version"] == "3" else 0
        if units and not {"hidden_in", "hidden_out"} <= set(tensors):
            raise InvalidInput(f"kvzap scorer at {str(p)!r} declares {units} hidden units but holds no hidden layer; train it again")
        names = tuple(json.loads(meta.get("features", "[]")))
        if unknown := [n for n in names if n not in KNOWN_FEATURES]:
            raise InvalidInput(f"kvzap scorer at {str(p)!r} reads features {unknown} this headwise does not know; train it again")
        hidden = (tensors["hidden_in"].float(), tensors["hidden_out"].float()) if units else (None, None)
        sc = cls(meta.get("model_id", ""), tensors["weight"].float(), json.loads(meta.get("training", "{}")), names,
                 int(meta["version"]), *hidden)
        if sc.hidden_units != units:
            raise InvalidInput(f"kvzap scorer at {str(p)!r} declares {units} hidden units, its hidden layer has {sc.hidden_units}; train it again")
        return sc


def scorer_path(key: str, version: int = SCORER_VERSION) -> Path:
    from headwise.profiles import profile_dir

    return profile_dir() / f"kvzap-{key}-v{version}.safetensors"


def packaged_path(key: str, version: int = SCORER_VERSION) -> Path:
    return PACKAGED / f"kvzap-{key}-v{version}.safetensors"


_LOADED: dict[str, KVScorer] = {}


def load_scorer(model_id: str) -> KVScorer:
    """The scorer of a model by its weights' id: memoised, else the profile directory, else the package."""
    if not model_id:
        raise InvalidInput("kvzap needs the model's identity to find its scorer; compress through ModelRunner "
                           "(prefill_segment / context()) or pass CompressContext(model_id=...)")
    if model_id in _LOADED:
        return _LOADED[model_id]
    for path in [p for v in sorted(READABLE_VERSIONS, reverse=True) for p in (scorer_path(model_id, v), packaged_path(model_id, v))]:
        if path.is_file():  # the newest format first; a trained file before the shipped one
            _LOADED[model_id] = KVScorer.load(path).check_model(model_id)
            return _LOADED[model_id]
    old = [p for p in (scorer_path(model_id).parent, PACKAGED) for p in sorted(p.glob(f"kvzap-{model_id}-v*.safetensors"))]
    raise InvalidInput(
        f"no kvzap scorer for model {model_id[:16]} (looked in {scorer_path(model_id).parent} and the package"
        + (f"; found only another format version: {', '.join(p.name for p in old)}" if old else "")
        + "); train one with `headwise scorer train --model PATH` (minutes on CPU), or use policy 'kvzip'"
    )


def scorer_for(runner, train: bool = False, progress: Progress | None = None, **kw) -> KVScorer:
    """The runner's scorer: loaded (see load_scorer), else trained and saved when `train`."""
    from headwise.profiles import weights_key

    key = weights_key(runner)
    try:
        sc = load_scorer(key)
    except InvalidInput:
        if not train:
            raise
        sc = train_scorer(runner, progress=progress, **kw)
        sc.save(scorer_path(key))
        _LOADED[key] = sc
    return sc.check_shape(runner.num_layers, runner.num_kv_heads, runner.config.hidden_size)


def forget_loaded() -> None:
    """Drop memoised scorers (tests, or after retraining in the same process)."""
    _LOADED.clear()


# ---- training ---------------------------------------------------------------------------
def training_ids(runner, count: int) -> list[list[int]]:
    """`count` context segments (chat template head + one document each), as the service prefills them."""
    from headwise.profiles.texts import training_documents
    from headwise.prompt import build_segments

    if runner.tokenizer is None:
        raise InvalidInput("this model has no tokenizer; pass the training documents as token ids")
    texts = training_documents(runner.tokenizer, count)
    if len(texts) < count:
        raise InvalidInput(f"only {len(texts)} training documents available, {count} asked for")
    return [build_segments(runner.tokenizer, t, "").context for t in texts]


def _scored(runner, ids: list[int], cache: Path | None = None):
    """KVzip's scores of one document with the layers' hidden states (and keys): one prefill + KVzip's
    reconstruction pass, or, with `cache` (a directory), read back from the file a previous run wrote
    there (named by the weights' hash and the ids' hash), so experiments do not rerun KVzip's passes."""
    from headwise.policies.base import Capture, LayerState

    path = None
    if cache is not None:
        import hashlib

        from headwise.profiles import weights_key

        digest = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:24]
        path = Path(cache) / f"{weights_key(runner)[:16]}-{digest}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            t = load_file(str(path))
            S = t["hidden"].shape[1]
            return [LayerState(i, t["keys"][i].float(), t["values"][i].float(), torch.arange(S), 0.0,
                               reconstruction=t["reconstruction"][i], hidden=t["hidden"][i].float())
                    for i in range(t["hidden"].shape[0])]
    states = runner.prefill(ids, capture=Capture(hidden=True, reconstruction=True)).states
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"hidden": torch.stack([s.hidden.float().cpu() for s in states]).contiguous(),
                   "keys": torch.stack([s.keys.half().cpu() for s in states]).contiguous(),
                   "values": torch.stack([s.values.half().cpu() for s in states]).contiguous(),
                   "reconstruction": torch.stack([s.reconstruction.float().cpu() for s in states]).contiguous()},
                  str(tmp))
        tmp.replace(path)
    return states


def _pairs(state, names: tuple[str, ...] = FEATURES) -> tuple[Tensor, Tensor]:
    """Rows the policy ranks (not the forced sinks/window): x [n, F + 1], log score [n, Hkv], fp32
    (one document's products are summed in fp32, the documents' sums in fp64: 4x faster than fp64)."""
    S = state.num_tokens
    x = features(state, names)[SKIP_SINKS : S - SKIP_WINDOW]
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    y = state.reconstruction[:, SKIP_SINKS : S - SKIP_WINDOW].float().clamp_min(LOG_FLOOR).log().T
    return x, y


def doc_cutoffs(states) -> Tensor:
    """The log KVzip score at each of `CUTOFFS`' global cutoffs of one document: over the rows the
    policy ranks in every layer and head at once (what the global budget compares). [len(CUTOFFS)] fp32."""
    S = states[0].num_tokens
    y = torch.cat([s.reconstruction[:, SKIP_SINKS : S - SKIP_WINDOW].float().flatten().cpu() for s in states])
    y = y.clamp_min(LOG_FLOOR).log()
    return torch.tensor([float(y.topk(max(1, round(q * y.numel()))).values[-1]) for q in CUTOFFS])


def fit_cutoffs(x: Tensor, y: Tensor, tau: Tensor, w0: Tensor, temperature: float = TEMPERATURE,
                mse: float = MSE_WEIGHT, iterations: int = FIT_ITERATIONS) -> Tensor:
    """One layer's map fitted to where its rows fall against the documents' global cutoffs.

    x [n, F + 1] (bias last), y [n, Hkv] log scores, tau [n, K] the cutoffs of each row's document
    (`doc_cutoffs`), w0 [F + 1, Hkv] the start (the ridge solution). The prediction f = x W stays a
    log score, one scale for every layer, and the loss is the logistic one of "y above tau_k"
    with P = sigmoid((f - tau_k) / temperature) at every cutoff k (what the global ranking at kept
    0.5 .. 0.05 decides), plus `mse` times the squared error to the log score raised to the
    kept-0.5 cutoff (the order below it never matters), plus the ridge's shrinkage. L-BFGS on
    standardised inputs; returned in raw input space. [F + 1, Hkv] fp32."""
    x, y, tau, w0 = x.float(), y.float(), tau.float(), w0.float()
    n = x.shape[0]
    mu, sd = x[:, :-1].mean(0), x[:, :-1].std(0).clamp_min(1e-6)
    xs = torch.cat([(x[:, :-1] - mu) / sd, torch.ones(n, 1, dtype=x.dtype)], 1)
    w = torch.cat([w0[:-1] * sd[:, None], (w0[-1] + mu @ w0[:-1])[None]], 0).clone().requires_grad_(True)
    above = (y[:, :, None] > tau[:, None, :]).float()  # [n, Hkv, K]
    raised = torch.maximum(y, tau[:, :1])
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = xs @ w
        z = (f[:, :, None] - tau[:, None, :]) / temperature
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, above) * tau.shape[1]
        loss = loss + mse * ((f - raised) ** 2).mean() + RIDGE * (w[:-1] ** 2).sum() / w.shape[1]
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()
    return torch.cat([w[:-1] / sd[:, None], (w[-1] - (mu / sd) @ w[:-1])[None]], 0)


def fit_hidden(x: Tensor, y: Tensor, tau: Tensor, w0: Tensor, units: int, temperature: float = TEMPERATURE,
               mse: float = MSE_WEIGHT, iterations: int = MLP_ITERATIONS, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's linear map plus a hidden layer of `units` ReLU units beside it, fitted together with
    `fit_cutoffs`' loss (the logistic terms at the documents' global cutoffs, `mse` times the squared
    error to the log score raised to the kept-0.5 cutoff, ridge shrinkage on every matrix).

    x [n, F + 1] (bias last), y [n, Hkv], tau [n, K], w0 [F + 1, Hkv] the linear start (its
    prediction is where the fit starts: the hidden layer's output matrix starts at zero). L-BFGS
    on standardised inputs, full batch, seeded. Returned in raw input space: the linear map
    [F + 1, Hkv], the hidden layer's input matrix [F + 1, units] and output matrix [units, Hkv]."""
    import math

    x, y, tau, w0 = x.float(), y.float(), tau.float(), w0.float()
    n, F1 = x.shape
    g = torch.Generator().manual_seed(seed)
    mu, sd = x[:, :-1].mean(0), x[:, :-1].std(0).clamp_min(1e-6)
    xs = torch.cat([(x[:, :-1] - mu) / sd, torch.ones(n, 1, dtype=x.dtype)], 1)
    w = torch.cat([w0[:-1] * sd[:, None], (w0[-1] + mu @ w0[:-1])[None]], 0).clone().requires_grad_(True)
    a = (torch.randn(F1, units, generator=g) / math.sqrt(F1)).requires_grad_(True)
    b = torch.zeros(units, y.shape[1]).requires_grad_(True)
    above = (y[:, :, None] > tau[:, None, :]).float()
    raised = torch.maximum(y, tau[:, :1])
    opt = torch.optim.LBFGS([w, a, b], lr=1, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = xs @ w + torch.relu(xs @ a) @ b
        z = (f[:, :, None] - tau[:, None, :]) / temperature
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, above) * tau.shape[1]
        loss = loss + mse * ((f - raised) ** 2).mean()
        loss = loss + RIDGE * ((w[:-1] ** 2).sum() / w.shape[1] + (a ** 2).sum() / units + (b ** 2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, a, b = w.detach(), a.detach(), b.detach()

    def raw(m: Tensor) -> Tensor:  # standardised-input matrix -> raw-input matrix (bias row last)
        return torch.cat([m[:-1] / sd[:, None], (m[-1] - (mu / sd) @ m[:-1])[None]], 0)

    return raw(w), raw(a), b


def fit_on_prediction(x: Tensor, y: Tensor, tau: Tensor, w_lin: Tensor, units: int, hidden_size: int,
                      iterations: int = MLP_ITERATIONS) -> tuple[Tensor, Tensor, Tensor]:
    """A hidden layer over a small input: the linear map's own prediction (one log score per KV head)
    and the features beside the hidden state (place, key/value norms), fitted by `fit_hidden` with the
    linear prediction as its start. Every input is linear in the features, so the result is a format-3
    hidden layer over them (its input matrix of rank <= Hkv + extras): [F + 1, Hkv], [F + 1, units],
    [units, Hkv]. The hidden state's 576 inputs reach the units only through the linear prediction,
    which is what keeps 40 documents from overfitting them (a hidden layer on every input does)."""
    H, D = w_lin.shape[1], hidden_size
    x, w_lin = x.float(), w_lin.float()
    z = torch.cat([x @ w_lin, x[:, D:]], 1)  # [n, H + extras + 1], the bias column last
    start = torch.zeros(z.shape[1], H)
    start[:H] = torch.eye(H)
    v, a, b = fit_hidden(z, y, tau, start, units, iterations=iterations)

    def to_features(m: Tensor) -> Tensor:  # z-space matrix -> feature-space matrix
        out = w_lin @ m[:H]
        out[D:] += m[H:]
        return out

    return to_features(v), to_features(a), b


def _solve(xtx: Tensor, xty: Tensor) -> Tensor:
    """Ridge per layer from the normal equations; the bias (last input) is not shrunk. -> [L, D + 1, H] fp32."""
    D = xtx.shape[-1] - 1  # the inputs; the bias is last
    out = []
    for a, b in zip(xtx, xty, strict=True):
        reg = torch.zeros(D + 1, dtype=a.dtype)
        reg[:D] = RIDGE * a.diagonal()[:D].mean()
        out.append(torch.linalg.solve(a + torch.diag(reg), b))
    return torch.stack(out).float()


def train_scorer(
    runner, docs: list[list[int]] | None = None, heldout: int = HELDOUT_DOCS, train_docs: int = TRAIN_DOCS,
    progress: Progress | None = None, cache: Path | None = None, names: tuple[str, ...] = FEATURES,
    objective: str = OBJECTIVE, hidden_units: int = HIDDEN_UNITS, iterations: int | None = None,
    hidden_inputs: str = "prediction",
) -> KVScorer:
    """Fit on KVzip's scores of `docs` (default: standard-library docstrings) minus the last `heldout`,
    report the fit on those. Minutes on CPU for the default model: the cost is KVzip's scoring pass
    (`cache`: a directory that keeps those scores per document, read back by a later run).
    `objective` "ridge": the least-squares fit of the log scores (normal equations, memory flat in
    the text); "cutoffs": from there, `fit_cutoffs` per layer (the rows are held, fp16: ~36 KB a token
    for the default model). `hidden_units` > 0: a hidden layer of that many ReLU units beside the
    linear map, fitted with it by the `cutoffs` loss (needs objective "cutoffs"): `hidden_inputs`
    "prediction" on the cutoff-fitted linear map's prediction and the extra features
    (`fit_on_prediction`), "features" on every feature (`fit_hidden`).
    `iterations`: L-BFGS iterations per layer (default FIT_ITERATIONS, or MLP_ITERATIONS with a hidden layer)."""
    from headwise.profiles import weights_key

    if objective not in OBJECTIVES:
        raise InvalidInput(f"kvzap scorer objective {objective!r} is not one of {OBJECTIVES}")
    if hidden_units < 0 or (hidden_units and objective != "cutoffs"):
        raise InvalidInput(f"kvzap scorer: {hidden_units} hidden units; a hidden layer (> 0 units) is fitted with objective 'cutoffs'")
    if hidden_inputs not in HIDDEN_INPUTS:
        raise InvalidInput(f"kvzap scorer hidden inputs {hidden_inputs!r} are not one of {HIDDEN_INPUTS}")
    iterations = iterations or (MLP_ITERATIONS if hidden_units else FIT_ITERATIONS)
    progress = progress or (lambda s, f: None)
    docs = docs if docs is not None else training_ids(runner, train_docs + heldout)
    if len(docs) <= heldout:
        raise InvalidInput(f"{len(docs)} documents leave none to train on after {heldout} held out")
    fit_docs, held = docs[: len(docs) - heldout], docs[len(docs) - heldout :]
    L, H = runner.num_layers, runner.num_kv_heads
    F = num_features(runner.config.hidden_size, H, names)
    xtx = torch.zeros(L, F + 1, F + 1, dtype=torch.float64)
    xty = torch.zeros(L, F + 1, H, dtype=torch.float64)
    held_rows: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(L)]  # "cutoffs": (x, y, tau) per document
    t0, total = time.perf_counter(), len(docs)
    for j, ids in enumerate(fit_docs):
        states = _scored(runner, ids, cache)
        tau = doc_cutoffs(states) if objective == "cutoffs" else None
        for i, st in enumerate(states):
            x, y = _pairs(st, names)
            xtx[i] += (x.T @ x).cpu().double()
            xty[i] += (x.T @ y).cpu().double()
            if tau is not None:
                held_rows[i].append((x.cpu().half(), y.cpu(), tau))
        del states
        progress(f"KVzip scores, training document {j + 1}/{len(fit_docs)}", (j + 1) / total)
    weight = _solve(xtx, xty)
    hidden_in = torch.zeros(L, F + 1, hidden_units) if hidden_units else None
    hidden_out = torch.zeros(L, hidden_units, H) if hidden_units else None
    if objective == "cutoffs":
        for i, rows in enumerate(held_rows):
            x = torch.cat([r[0] for r in rows]).float()
            tau = torch.cat([r[2].expand(r[0].shape[0], -1) for r in rows])
            y = torch.cat([r[1] for r in rows])
            held_rows[i] = []  # free as we go
            if hidden_units and hidden_inputs == "prediction":
                w = fit_cutoffs(x, y, tau, weight[i])
                weight[i], hidden_in[i], hidden_out[i] = fit_on_prediction(x, y, tau, w, hidden_units,
                                                                           runner.config.hidden_size, iterations)
            elif hidden_units:
                weight[i], hidden_in[i], hidden_out[i] = fit_hidden(x, y, tau, weight[i], hidden_units, iterations=iterations)
            else:
                weight[i] = fit_cutoffs(x, y, tau, weight[i], iterations=iterations)
            progress(f"fitting layer {i + 1}/{L} to the cutoffs", len(fit_docs) / total)
    scorer = KVScorer(weights_key(runner), weight, features=tuple(names), hidden_in=hidden_in, hidden_out=hidden_out)
    fit = evaluate(runner, scorer, held, lambda s, f: progress(s, (len(fit_docs) + f * len(held)) / total), cache)
    scorer.training = {
        "source": f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard-library docstrings "
                  "(headwise.profiles.texts)" if runner.tokenizer is not None else "given token ids",
        "train_docs": len(fit_docs), "train_tokens": sum(map(len, fit_docs)),
        "heldout_docs": len(held), "heldout_tokens": sum(map(len, held)),
        "features": ["hidden", *names], "ridge": RIDGE, "log_floor": LOG_FLOOR, "skip": [SKIP_SINKS, SKIP_WINDOW],
        "objective": objective, "hidden_units": hidden_units} | (
            {"hidden_inputs": hidden_inputs} if hidden_units else {}) | (
            {"cutoffs": list(CUTOFFS), "temperature": TEMPERATURE, "mse_weight": MSE_WEIGHT,
             "iterations": iterations} if objective == "cutoffs" else {}) | {
        "seconds": round(time.perf_counter() - t0, 1), "fit": fit,
    }
    progress("done", 1.0)
    return scorer


# ---- fit --------------------------------------------------------------------------------
def spearman(a: Tensor, b: Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by order; KVzip's scores are floats)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def topk_overlap(pred: Tensor, true: Tensor, frac: float) -> float:
    """Share of KVzip's top `frac` rows that the prediction's top `frac` also keeps."""
    k = max(1, round(frac * true.numel()))
    a = torch.zeros(true.numel(), dtype=torch.bool)
    a[pred.flatten().topk(k).indices] = True
    return float(a[true.flatten().topk(k).indices].float().mean())


def evaluate(runner, scorer: KVScorer, docs: list[list[int]], progress: Progress | None = None,
             cache: Path | None = None) -> dict:
    """Fit on held-out documents, each metric averaged over documents: Spearman over all (layer, head,
    token) rows at once (what the global budget ranks), within each layer and within each head, and
    the overlap of the kept sets at kept 0.25 and 0.1 (forced sinks/window rows left out)."""
    progress = progress or (lambda s, f: None)
    rows = []
    for j, ids in enumerate(docs):
        states = _scored(runner, ids, cache)
        S = states[0].num_tokens
        sl = slice(SKIP_SINKS, S - SKIP_WINDOW)
        pred = torch.stack([scorer.predict(st)[:, sl] for st in states]).cpu()  # [L, H, n]
        true = torch.stack([st.reconstruction[:, sl] for st in states]).cpu()  # [L, H, n]
        rows.append({
            "global": spearman(pred.flatten(), true.flatten()),
            "layer": sum(spearman(p.flatten(), t.flatten()) for p, t in zip(pred, true, strict=True)) / len(pred),
            "head": sum(spearman(p, t) for p, t in zip(pred.flatten(0, 1), true.flatten(0, 1), strict=True)) / (pred.shape[0] * pred.shape[1]),
            "overlap_0.25": topk_overlap(pred, true, 0.25), "overlap_0.1": topk_overlap(pred, true, 0.1),
        })
        progress(f"fit on held-out document {j + 1}/{len(docs)}", (j + 1) / len(docs))
    if not rows:
        return {}
    return {f"spearman_{k}" if not k.startswith("overlap") else k: round(sum(r[k] for r in rows) / len(rows), 4)
            for k in rows[0]}
