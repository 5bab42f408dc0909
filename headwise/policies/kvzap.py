from dataclasses import dataclass, replace

from headwise.cache.compact import CompactCache
from headwise.errors import InvalidInput
from headwise.policies.base import Capture, CompressContext, LayerState
from headwise.policies.kvzip import KVzipPolicy


@dataclass(frozen=True)
class KVzapPolicy(KVzipPolicy):
    """KVzip's scores predicted from the prefill's own hidden states (KVzap, arXiv 2601.07891), global ragged budget.

    A per-layer linear map (format 3: with an optional small hidden layer beside it), trained
    once per model on KVzip's reconstruction scores (`headwise scorer train`, stored by the
    weights' hash like the head profiles; the default model's ships in the package), turns each
    layer's normed input of a token, its place in the segment and the norms of its key and value
    rows into the predicted log KVzip score of its row in every KV head. Rows are then ranked over ALL
    layers and heads at once exactly as `kvzip` ranks its measured scores (`sinks` first and
    `window` last rows of every head forced), so no second pass over the segment is run:
    the compression costs a few small matmuls per layer on top of the plain prefill.
    Query-agnostic, hence reusable.
    """

    name = "kvzap"
    log_signal = True  # the predictions are log scores: exp before a prior multiplies them or EMS weighs by them

    @property
    def capture(self) -> Capture:
        return Capture(hidden=True)

    def params(self) -> dict:
        from headwise.profiles.scorer import SCORER_VERSION

        return super().params() | {"scorer_version": SCORER_VERSION}  # a new scorer format changes the bytes

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
        if round(self.kept * L * H * S) >= L * H * S:
            return super().compress(states, start, ctx)  # keeps everything, reads no score
        if states[0].hidden is None:
            raise InvalidInput("kvzap needs the layers' hidden states; prefill with the policy's capture (Capture(hidden=True))")
        from headwise.profiles.scorer import load_scorer

        scorer = load_scorer(ctx.model_id if ctx else "").check_shape(L, H, states[0].hidden.shape[-1])
        predicted = [replace(s, reconstruction=scorer.predict(s)) for s in states]  # [Hkv, S] each
        return super().compress(predicted, start, ctx)
