"""The parity suite's cases: every public lsa method on fixed tiny random models of every family.

A case is a named call ``fn(ctx, model) -> result`` on one family's
:class:`Context` (a :func:`helpers.parity_model`, fixed prompt sets and texts). Its id
says where it runs and what it is: ``local/<method>/<variant>`` on the local model,
``remote/<method>/<variant>`` on its ``remote="local"`` twin (nnsight's simulated
NDIF request; families :data:`REMOTE_FAMILIES` only, it is slower), and
``local/steered/<method>`` under the neuron edits of :meth:`Context.edits`.

``scripts/freeze_parity.py`` runs every case with today's code and keeps the results
(:func:`parity.plain.plain`) in ``tests/parity/frozen/<family>.pt.gz``;
``tests/test_parity.py`` reruns them and compares to 1e-6. Steered cases are frozen
on the local model only (the remote engine ignored steering edits then, issue 13);
:data:`REMOTE_STEERED` lists the steered cases whose remote twins are compared with
the frozen local answer (``"bug"``: they differed before the engine, ``"ok"``: they agreed).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import FAMILIES, make_prompts, oriented, parity_model  # noqa: E402

from lsa import ablation, attribution, behaviour, circuits, engine, flow, lens, metrics, patching  # noqa: E402
from lsa import neurons as N  # noqa: E402
from lsa import steering as S  # noqa: E402

FROZEN_DIR = Path(__file__).resolve().parent / "frozen"
FORMAT = "lsa.parity/1"
REMOTE_FAMILIES = ("gpt2", "qwen2")  # full attention + Conv1D / grouped-query + separate q, k, v projections
# Float32 results move with the CPU they run on (accumulation order of its kernels): on a second
# machine (avx512 with AMX) 164 of 1164 cases moved beyond 1e-6, median 2.6e-6, at most 4.2e-4 (a
# normalised faithfulness 5.3 whose denominator is small on a random model: 7.9e-5 relative).
RTOL = ATOL = 1e-4
STEERED_TOL = 1e-4


def frozen_path(family: str, folder: Path = FROZEN_DIR) -> Path:
    return folder / f"{family}.pt.gz"


def save_frozen(payload: dict, path: Path) -> None:
    """``torch.save`` then gzip without a timestamp: the same payload gives the same bytes."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0))


def load_frozen(family: str, folder: Path = FROZEN_DIR) -> dict:
    """A family's frozen payload (``{"format", "family", "versions", "cases"}``), loaded with ``weights_only``."""
    data = gzip.decompress(frozen_path(family, folder).read_bytes())
    payload = torch.load(io.BytesIO(data), weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{frozen_path(family, folder)} is not a {FORMAT} file")
    return payload


# ----------------------------------------------------------------- inputs
def word_texts(n: int, low: int, high: int, seed: int) -> list[str]:
    """``n`` texts of 3-9 words ``w{low} .. w{high - 1}`` of the word tokenizer (a 'language')."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(low, high)}" for _ in range(rng.randint(3, 9))) for _ in range(n)]


class Context:
    """One family's model and inputs, built once (everything is seeded)."""

    def __init__(self, family: str):
        self.family = family

    @cached_property
    def model(self):
        return parity_model(self.family, seed=0)

    @cached_property
    def remote(self):
        """The same weights behind nnsight's simulated remote path."""
        return dataclasses.replace(self.model, remote="local")

    @property
    def sequential(self) -> bool:
        """Whether the model has a ``resid_mid`` (no parallel residual)."""
        return not self.model.adapter.parallel_residual

    @cached_property
    def prompts(self):
        """3 right-padded prompt pairs of lengths 6, 4, 5 (named positions ``first``, ``mid``), oriented (see helpers.oriented)."""
        return oriented(self.model, make_prompts(n=3, pos=6, lengths=[6, 4, 5], seed=0))

    @cached_property
    def even(self):
        """3 prompt pairs of one length (5), for ``positions="each"``."""
        return oriented(self.model, make_prompts(n=3, pos=5, seed=1))

    @cached_property
    def other(self):
        """4 more prompt pairs (a reference set, a second 'language')."""
        return oriented(self.model, make_prompts(n=4, pos=6, lengths=[6, 6, 3, 5], seed=2))

    @cached_property
    def texts(self) -> dict[str, list[str]]:
        """Two word 'languages': ``en`` uses words w3-w49, ``zh`` w50-w96 (7 texts: batches of 3 are ragged)."""
        return {"en": word_texts(8, 3, 50, seed=0), "zh": word_texts(7, 50, 97, seed=1)}

    @cached_property
    def stats(self):
        return N.collect_stats(self.model, self.texts, batch_size=3, progress=False)

    @cached_property
    def acts(self):
        return flow.capture(self.model, self.prompts.clean)

    @cached_property
    def flow(self):
        return flow.contributions(self.model, self.prompts.clean, self.prompts.lengths)

    @cached_property
    def edits(self) -> list:
        """Every kind of neuron edit at once: set, scale, replace with a mean, shift by a difference of means."""
        d = self.model.adapter.d_mlp
        return [
            S.deactivate({0: torch.arange(0, d, 2)}),
            S.scale({1: [1, 3, 4]}, 3.0),
            S.activate({1: [6, 8]}, self.stats, "zh", strength=4.0),
            S.shift({0: [9, 11]}, self.stats, "en", "zh", strength=2.0),
        ]


def zoo_steering():
    """Issue 13's steering check on the zoo's ``toy-bilingual``: ``(local, remote twin, IOI en prompts, edits)``.

    Edits: LAPE (default thresholds) on the shipped en and zh corpora; the en neurons set
    to 0 and the zh neurons set to 4 x their zh mean. Shared by ``tests/test_parity.py`` and
    ``scripts/engine_stats.py``, so the test and the reported numbers use one configuration.
    """
    import lsa
    from lsa import tasks

    local = lsa.load_model("toy-bilingual", device="cpu")
    remote = dataclasses.replace(local, remote="local")
    prompts = tasks.build("ioi", "en", local.tokenizer, n=12, seed=3)
    texts = {lang: N.load_corpus(lang) for lang in ("en", "zh")}
    stats = N.collect_stats(local, texts, batch_size=16, progress=False)
    found = N.lape(stats)
    edits = [S.deactivate(found.mask("en")), S.activate(found.mask("zh"), stats, "zh", strength=4.0)]
    return local, remote, prompts, edits


# ----------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Case:
    id: str
    fn: Callable
    families: tuple[str, ...]
    steered: bool = False

    @property
    def remote(self) -> bool:
        return self.id.startswith("remote/")

    def run(self, ctx: Context):
        """The case's result on ``ctx``: seeded, quiet, under the steering edits for steered cases."""
        model = ctx.remote if self.remote else ctx.model
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.steered:
                edits = ctx.edits
                with S.steer(model, *edits):
                    return self.fn(ctx, model)
            return self.fn(ctx, model)


CASES: dict[str, Case] = {}
# remote twins of steered cases, compared with the frozen local result ("bug": differed before the engine)
REMOTE_STEERED: dict[str, str] = {}


def add(name: str, fn: Callable, *, remote: bool = False, families=FAMILIES, steered: str | None = None) -> None:
    """Register ``local/<name>`` (and ``remote/<name>`` on :data:`REMOTE_FAMILIES` with ``remote``).

    ``steered``: register ``local/steered/<name>`` instead, run under :meth:`Context.edits`;
    its remote twin is listed in :data:`REMOTE_STEERED` as ``"bug"`` (differs today) or ``"ok"``
    (agrees today); ``"local"``: the method has no remote path.
    """
    families = tuple(families)
    if steered is not None:
        key = f"local/steered/{name}"
        CASES[key] = Case(key, fn, families, steered=True)
        if steered != "local":
            REMOTE_STEERED[key] = steered
        return
    key = f"local/{name}"
    if key in CASES:
        raise ValueError(f"case {key} registered twice")
    CASES[key] = Case(key, fn, families)
    if remote:
        rkey = f"remote/{name}"
        CASES[rkey] = Case(rkey, fn, tuple(f for f in families if f in REMOTE_FAMILIES))


def cases_for(family: str) -> list[Case]:
    return [c for c in CASES.values() if family in c.families]


def sequential_families() -> tuple[str, ...]:
    """Families with a ``resid_mid`` (all but GPT-NeoX's parallel residual)."""
    return tuple(f for f in FAMILIES if f != "gpt_neox")


SEQ = sequential_families()

# ----------------------------------------------------------------- activation patching
for _site in patching.SITES:
    for _direction in patching.DIRECTIONS:
        add(
            f"activation_patching/{_site}/{_direction}",
            lambda c, m, s=_site, d=_direction: patching.activation_patching(
                m, c.prompts, s, direction=d, progress=False
            ),
            remote=_direction == "noising" or _site == "head",
            families=SEQ if _site == "resid_mid" else FAMILIES,
        )
add(
    "activation_patching/resid_pre/each",
    lambda c, m: patching.activation_patching(m, c.even, "resid_pre", positions="each", progress=False),
    remote=True,
)
add(
    "activation_patching/attn_out/each/denoising",
    lambda c, m: patching.activation_patching(
        m, c.even, "attn_out", positions="each", direction="denoising", progress=False
    ),
)
add(
    "activation_patching/head/named_positions",
    lambda c, m: patching.activation_patching(
        m, c.prompts, "head", positions=["first", "mid", "end", 2, None], progress=False
    ),
    remote=True,
)
add(
    "activation_patching/head/subset/batch1",
    lambda c, m: patching.activation_patching(
        m, c.prompts, "head", layers=[1], heads=[0, 2], direction="denoising", batch_size=1, progress=False
    ),
)
add(
    "activation_patching/neuron/subset/mid_end",
    lambda c, m: patching.activation_patching(
        m, c.prompts, "neuron", layers=[1], neurons=[0, 5, 7], positions=["mid", "end"], progress=False
    ),
    remote=True,
)
add(
    "activation_patching/mlp_out/max_tokens",
    lambda c, m: patching.activation_patching(m, c.prompts, "mlp_out", max_tokens=12, progress=False),
)


def answer_logprob(logits: torch.Tensor, prompts) -> torch.Tensor:
    """A metric other than the default: log-probability of the answer at the end position, ``[n]``."""
    last = metrics.end_logits(logits, prompts).float().log_softmax(-1)
    return last[torch.arange(last.shape[0]), prompts.answer.to(last.device)]


add(
    "activation_patching/resid_post/logprob",
    lambda c, m: patching.activation_patching(m, c.prompts, "resid_post", metric=answer_logprob, progress=False),
)


def _engine_run(m, tokens, plan: engine.Plan):
    """One engine run as ``(logits, {(site, layer): value})`` (frozen when it was ``patching.forward``)."""
    out = engine.run(m, tokens, plan)
    return out.logits, out.values


def _forward_edits_reads(c, m):
    """An engine run with edits and reads at every site kind of both layers."""
    reads = [("resid_pre", 1), ("attn_in", 1), ("head", 1), ("attn_out", 0), ("neuron", 0), ("mlp_out", 1)]
    reads += [("resid_post", 0), ("attn_full", 1)] + ([("resid_mid", 0)] if c.sequential else [])
    edits = [engine.Edit("head", 0, lambda x: 0.5 * x), engine.Edit("neuron", 1, lambda x: x + 0.25)]
    if c.sequential:
        edits.append(engine.Edit("resid_mid", 1, lambda x: x * 1.5))
    plan = engine.Plan(edits=edits, reads=[engine.Read(*r) for r in reads], end=c.prompts.end)
    return _engine_run(m, c.prompts.clean, plan)


def _forward_start_stop(c, m):
    """An engine run started at block 1 from the cached residual, stopped after layer 1's MLP write."""
    hidden = patching.baseline(m, c.prompts, c.prompts.clean)[("resid_pre", 1)]
    plan = engine.Plan(
        reads=[engine.Read("head", 1), engine.Read("mlp_out", 1)],
        start=engine.Start(1, hidden),
        stop_after=("mlp_out", 1),
        end=c.prompts.end,
    )
    return _engine_run(m, c.prompts.clean, plan)


add("forward/edits_reads", _forward_edits_reads, remote=True)
add("forward/start_stop", _forward_start_stop)


def _baseline(c, m):
    """``patching.baseline`` as ``(logits, {(site, layer): value})`` (frozen when it returned that pair)."""
    out = patching.baseline(m, c.prompts, c.prompts.corrupt, [("head", 0), ("mlp_out", 1)])
    return out.logits, out.values


add("baseline", _baseline)
add(
    "sweep_specs",
    lambda c, m: patching.sweep_specs(m, c.prompts, "neuron", layers=[0], neurons=[1, 2], positions=["mid", 0]),
)
add("model.logits", lambda c, m: m.logits(c.prompts.clean), remote=True)

# ----------------------------------------------------------------- path patching
add("path_patching/logits", lambda c, m: patching.path_patching(m, c.prompts, progress=False), remote=True)
add(
    "path_patching/logits/denoising",
    lambda c, m: patching.path_patching(m, c.prompts, direction="denoising", progress=False),
)
add(
    "path_patching/logits/groups",
    lambda c, m: patching.path_patching(m, c.prompts, [(0, 0), [(0, 1), (1, 2)], (1, 3)], progress=False),
    remote=True,
)
add(
    "path_patching/logits/logprob",
    lambda c, m: patching.path_patching(m, c.prompts, metric=answer_logprob, progress=False),
)
for _kind in ("q", "k", "v", "qkv"):
    add(
        f"path_patching/receiver_{_kind}",
        lambda c, m, k=_kind: patching.path_patching(
            m, c.prompts, receivers=[(1, 0)], receiver_input=k, progress=False
        ),
        remote=_kind
        != "qkv",  # remote qkv fails today: test_remote_path_patching_into_query_and_key_of_separate_projections
    )
add(
    "path_patching/receivers_kv/denoising/batch1",
    lambda c, m: patching.path_patching(
        m,
        c.prompts,
        [(0, h) for h in range(4)],
        [(1, 1), (1, 2)],
        receiver_input="kv",
        direction="denoising",
        batch_size=1,
        progress=False,
    ),
    remote=True,
)

# ----------------------------------------------------------------- attribution patching
for _site in patching.SITES:
    add(
        f"attribution_patching/{_site}",
        lambda c, m, s=_site: attribution.attribution_patching(m, c.prompts, s),
        remote=_site in ("head", "resid_mid", "mlp_out", "neuron"),
        families=SEQ if _site == "resid_mid" else FAMILIES,
    )
add(
    "attribution_patching/head/denoising/named",
    lambda c, m: attribution.attribution_patching(
        m, c.prompts, "head", direction="denoising", positions=["mid", "end"]
    ),
    remote=True,
)
add(
    "attribution_patching/attn_out/logprob",
    lambda c, m: attribution.attribution_patching(m, c.prompts, "attn_out", metric=answer_logprob),
    remote=True,
)
add(
    "attribution_patching/resid_pre/each",
    lambda c, m: attribution.attribution_patching(m, c.even, "resid_pre", positions="each"),
)
add(
    "attribution_patching/neuron/subset",
    lambda c, m: attribution.attribution_patching(m, c.prompts, "neuron", layers=[0], neurons=[2, 3, 40]),
)
add("attribution_patching/head/ig2", lambda c, m: attribution.attribution_patching(m, c.prompts, "head", steps=2))
add(
    "attribution_patching/resid_pre/ig3/denoising",
    lambda c, m: attribution.attribution_patching(m, c.prompts, "resid_pre", steps=3, direction="denoising"),
)
add(
    "attribution/compare",
    lambda c, m: attribution.attribution_vs_exact(m, c.prompts, "mlp_out", progress=False),
)

# ----------------------------------------------------------------- ablation
ABLATION_SITES = [("head", 1), ("mlp_out", 0), ("neuron", 1)]
COMPONENTS = [("head", 1, 2), ("mlp", 0), ("neuron", 1, 3), ("head", 0, 0)]
for _method in ablation.METHODS:
    add(
        f"ablation_values/{_method}",
        lambda c, m, me=_method: ablation.ablation_values(m, c.prompts, ABLATION_SITES, me),
        remote=_method == "mean",
    )
    add(
        f"ablate/{_method}",
        lambda c, m, me=_method: ablation.ablate(m, c.prompts, COMPONENTS, method=me),
        remote=_method != "zero",
    )
add(
    "ablation_values/mean/all_tokens/reference",
    lambda c, m: ablation.ablation_values(m, c.prompts, ABLATION_SITES, "mean", per_position=False, reference=c.other),
)
add(
    "ablation_values/resample/index/tensor_reference",
    lambda c, m: ablation.ablation_values(
        m, c.prompts, ABLATION_SITES, "resample", reference=c.other.clean, index=torch.tensor([3, 0, 2])
    ),
)
add(
    "ablate/resample/seed/answer_prob",
    lambda c, m: ablation.ablate(
        m, c.prompts, COMPONENTS[:2], method="resample", reference=c.other, seed=5, metric=metrics.answer_prob
    ),
)
add(
    "faithfulness/heads/mean",
    lambda c, m: ablation.faithfulness(m, c.prompts, [("head", 1, 2), ("head", 0, 1)], method="mean"),
    remote=True,
)
add(
    "faithfulness/mixed/resample",
    lambda c, m: ablation.faithfulness(m, c.prompts, [("head", 1, 0), ("neuron", 1, 3), ("mlp", 0)], method="resample"),
)
add(
    "faithfulness/heads_and_mlps/zero",
    lambda c, m: ablation.faithfulness(m, c.prompts, [("head", 1, 1)], method="zero", kinds=["head", "mlp"]),
)
add("complement", lambda c, m: ablation.complement(m, [("head", 1, 1), ("neuron", 0, 2)]))
for _site, _method in (("head", "mean"), ("mlp_out", "zero"), ("neuron", "resample")):
    add(
        f"ablation_sweep/{_site}/{_method}",
        lambda c, m, s=_site, me=_method: ablation.ablation_sweep(
            m, c.prompts, s, method=me, neurons=[0, 1, 2] if s == "neuron" else None, progress=False
        ),
        remote=_site == "head",
    )

# ----------------------------------------------------------------- behaviour
add("behaviour/end_logits", lambda c, m: behaviour.end_logits(m, c.prompts), remote=True)
add("behaviour/end_logits/corrupt/batch2", lambda c, m: behaviour.end_logits(m, c.other, corrupt=True, batch_size=2))
add("behaviour/score", lambda c, m: behaviour.score(m, c.prompts), remote=True)
add("behaviour/summarize", lambda c, m: behaviour.summarize(behaviour.score(m, c.other)))

# ----------------------------------------------------------------- circuits
DISCOVER = dict(k=1.0, floor=0.02, max_steps=3, positions="all", progress=False)  # the rule frozen before "auto"
add("circuits/path_step/logits", lambda c, m: circuits.path_step(m, c.prompts, k=1.0, floor=0.02), remote=True)
add(
    "circuits/path_step/q",
    lambda c, m: circuits.path_step(m, c.prompts, [(1, 0), (1, 3)], "q", k=1.0, floor=0.02, positions="all"),
    remote=True,
)
add("circuits/discover", lambda c, m: circuits.discover(m, c.prompts, **DISCOVER))
add(
    "circuits/discover/no_roles",
    lambda c, m: circuits.discover(m, c.prompts, roles=False, **DISCOVER),
    remote=True,
)
add(
    "circuits/discover/q/denoising/shared_edges",
    lambda c, m: circuits.discover(
        m, c.prompts, receiver_input="q", direction="denoising", per_receiver_edges=False, **DISCOVER
    ),
)
add("circuits/head_scores", lambda c, m: circuits.head_scores(m, c.prompts, chunk=2))
add(
    "circuits/attention_scores",
    lambda c, m: circuits.attention_scores(torch.stack(c.acts.pattern, 1), c.prompts),
)


def _two_circuits(c, m):
    a = circuits.discover(m, c.prompts, **DISCOVER).circuit
    b = circuits.discover(m, c.other, **DISCOVER).circuit
    return a, b


def _compare(c, m):
    a, b = _two_circuits(c, m)
    return {
        "component": circuits.compare(a, b, labels=("p", "o")),
        "role": circuits.compare(a, b, labels=("p", "o"), by="role"),
        "overlap": circuits.overlap_matrix({"p": a, "o": b}, "weighted_overlap"),
        "correlation": circuits.logit_effect_correlation(a, b),
    }


def _circuit_faithfulness(c, m):
    a, b = _two_circuits(c, m)
    sets = {"p": c.prompts, "o": c.other}
    return {
        "one": circuits.faithfulness(m, a, c.prompts),
        "table": circuits.faithfulness_table(m, {"p": a, "o": b}, sets, method="resample"),
    }


add("circuits/compare", _compare)
add("circuits/faithfulness", _circuit_faithfulness)

# ----------------------------------------------------------------- flow routes
add("flow/capture", lambda c, m: flow.capture(m, c.prompts.clean))
add("flow/contributions", lambda c, m: flow.contributions(m, c.prompts.clean, c.prompts.lengths))
add("flow/contributions/tau", lambda c, m: flow.contributions(m, c.other.clean, c.other.lengths, tau=0.04))
add(
    "flow/decompose_attention",
    lambda c, m: {
        "parts": flow.decompose_attention(m, c.acts, 1),
        "values": flow.head_values(m, c.acts, 0),
        "writes": flow.head_source_writes(m, c.acts, 1),
    },
)


def _routes(c, m):
    f = c.flow
    out = {
        "importance_any": flow.route_head_importance(f, 0.04),
        "importance_end": flow.route_head_importance(f, 0.02, positions=[2], into="end"),
        "heads_used": flow.heads_used(f, 0.1),
        "frame": flow.route_heads_frame(f, 0.04),
    }
    for i in range(len(f)):
        graph = flow.route(f, index=i, tau=0.04)
        out[f"route{i}"] = {"graph": graph, "heads": flow.route_heads(graph), "edges": flow.route_edges(graph)}
    out["route_pos"] = flow.route_edges(flow.route(f, index=0, position=3, tau=0.02))
    return out


def _frequency(c, m):
    freq = flow.head_frequency(m, {"a": c.prompts, "b": c.other}, tau=0.04, batch_size=2)
    return {
        "frequency": freq,
        "compare": flow.compare_frequency(freq, "a", "b"),
        "correlation": flow.frequency_correlation(freq, "a", "b"),
    }


add("flow/routes", _routes)
add("flow/head_frequency", _frequency)
add(
    "flow/neuron_contributions",
    lambda c, m: {
        "top": flow.neuron_contributions(m, c.prompts.clean, 1, 3, index=1, top=10),
        "all": flow.neuron_contributions(m, c.prompts.clean, 0, 5, index=0, top=None),
    },
    families=SEQ,
)

# ----------------------------------------------------------------- lens
add("lens/final_norm", lambda c, m: lens.final_norm(m))
add(
    "lens/write_logits",
    lambda c, m: {
        norm: lens.write_logits(m, c.acts.mlp_out[0][0, 2], c.acts.resid_post[-1][0, 2], norm=norm)
        for norm in lens.NORMS
    },
)
add(
    "lens/head_projection",
    lambda c, m: {
        norm: lens.head_projection(m, c.prompts.clean, 1, 2, position=-1, index=1, k=5, norm=norm)
        for norm in ("frozen", "apply")
    },
)
add("lens/ffn_projection", lambda c, m: lens.ffn_projection(m, c.prompts.clean, 0, position=3, k=5))
add(
    "lens/neuron_projection",
    lambda c, m: {
        "direction": lens.neuron_projection(m, 1, 3, k=5),
        "write": lens.neuron_projection(m, 0, 7, c.prompts.clean, position=2, index=2, k=5),
    },
)
add(
    "lens/logit_lens",
    lambda c, m: lens.logit_lens(m, c.prompts.clean, position=4, index=2, k=3, target=int(c.prompts.answer[2])),
)

# ----------------------------------------------------------------- neurons
add(
    "neurons/token_batches",
    lambda c, m: list(N.token_batches(m, [*c.texts["en"][:4], [5, 6, 7], torch.tensor([[8, 9]])], batch_size=3)),
)
add("neurons/collect_stats", lambda c, m: N.collect_stats(m, c.texts, batch_size=3, progress=False), remote=True)
add(
    "neurons/collect_stats/ids",
    lambda c, m: N.collect_stats(
        m,
        {"en": [[3, 4, 5, 6], torch.tensor([7, 8])], "zh": [torch.tensor([[50, 51, 52], [60, 61, 62]])]},
        batch_size=2,
        progress=False,
    ),
)
add("neurons/lape", lambda c, m: N.lape(c.stats, top_rate=0.05))
add("neurons/lape/defaults", lambda c, m: N.lape(c.stats))
add("neurons/plnd_importance", lambda c, m: N.plnd_importance(m, c.stats), remote=True)
add(
    "neurons/plnd_neurons", lambda c, m: N.plnd_neurons(N.plnd_importance(m, c.stats), c.stats.languages, top_rate=0.05)
)
add("neurons/neuron_profile", lambda c, m: N.neuron_profile(c.stats, 1, 2))
add(
    "neurons/sets",
    lambda c, m: {
        "random_like": N.random_like({0: [1, 2], 1: [3]}, m.adapter.d_mlp, exclude={0: [0, 4]}, seed=3),
        "union": N.union({0: [1, 2]}, [(0, 5), (1, 2)]),
        "count": N.neuron_count([[1, 2], [3]]),
    },
)


def _record(c, m):
    record = N.record_activations(m, c.texts, 1, max_texts=4, batch_size=2)
    return {"record": record, "top": N.top_activating(record, 3, k=3, window=2)}


add("neurons/record_activations", _record, remote=True)
add("neurons/promoted_tokens", lambda c, m: N.promoted_tokens(m, 1, 3, k=5), remote=True)
add(
    "neurons/language_report",
    lambda c, m: N.language_report(
        m,
        c.texts,
        top_rate=0.05,
        plnd_top_rate=0.05,
        n_random=1,
        strength=(2.0,),
        n_prompts=2,
        prompt_tokens=3,
        max_new_tokens=3,
        batch_size=4,
        progress=False,
    ),
)

# ----------------------------------------------------------------- steering (its own functions)
GEN_PROMPTS = ["w5 w9 w11", "w60 w61"]


def _forward_each_edit(c, m):
    ids = c.prompts.clean
    out = {"none": S.forward(m, ids)}
    for i, edit in enumerate(c.edits):
        with S.steer(m, edit):
            out[f"edit{i}"] = S.forward(m, ids)
    with S.steer(m, c.edits[0]), S.steer(m, *c.edits[1:]):
        out["nested"] = S.forward(m, ids, last_only=True)
    return out


add("steering/forward_each_edit", _forward_each_edit)
add("steering/language_loss", lambda c, m: S.language_loss(m, c.texts, edits=c.edits, batch_size=3))
add("steering/language_loss/plain", lambda c, m: S.language_loss(m, c.texts, batch_size=3), remote=True)
add("steering/generate_ids", lambda c, m: S.generate_ids(m, GEN_PROMPTS, edits=c.edits, max_new_tokens=4))
add("steering/generate", lambda c, m: S.generate(m, GEN_PROMPTS[0], edits=c.edits[:2], max_new_tokens=3))
add(
    "steering/steering_run",
    lambda c, m: S.steering_run(m, GEN_PROMPTS, c.edits, target_script="latin", max_new_tokens=3),
)

# ----------------------------------------------------------------- under steering (frozen locally)
add("forward", lambda c, m: S.forward(m, c.prompts.clean), steered="ok")
add("language_loss", lambda c, m: S.language_loss(m, c.texts, batch_size=3), steered="ok")
add("generate_ids", lambda c, m: S.generate_ids(m, GEN_PROMPTS, max_new_tokens=4), steered="ok")
add("behaviour/end_logits", lambda c, m: behaviour.end_logits(m, c.prompts), steered="bug")
add("model.logits", lambda c, m: m.logits(c.prompts.clean), steered="bug")
add(
    "activation_patching/head",
    lambda c, m: patching.activation_patching(m, c.prompts, "head", progress=False),
    steered="bug",
)
add(
    "activation_patching/neuron/subset",
    lambda c, m: patching.activation_patching(m, c.prompts, "neuron", layers=[1], neurons=[1, 3, 6], progress=False),
    steered="bug",
)
add(
    "activation_patching/resid_pre/denoising",
    lambda c, m: patching.activation_patching(m, c.prompts, "resid_pre", direction="denoising", progress=False),
    steered="bug",
)
add("path_patching/logits", lambda c, m: patching.path_patching(m, c.prompts, progress=False), steered="bug")
add(
    "path_patching/receiver_q",
    lambda c, m: patching.path_patching(m, c.prompts, receivers=[(1, 1)], progress=False),
    steered="bug",
)
add("attribution_patching/head", lambda c, m: attribution.attribution_patching(m, c.prompts, "head"), steered="bug")
add("ablate/mean", lambda c, m: ablation.ablate(m, c.prompts, COMPONENTS, method="mean"), steered="bug")
add("faithfulness", lambda c, m: ablation.faithfulness(m, c.prompts, [("head", 1, 2)]), steered="bug")
add("neurons/collect_stats", lambda c, m: N.collect_stats(m, c.texts, batch_size=3, progress=False), steered="bug")
add("neurons/record_activations", lambda c, m: N.record_activations(m, c.texts, 1, max_texts=4), steered="bug")
add("flow/contributions", lambda c, m: flow.contributions(m, c.prompts.clean, c.prompts.lengths), steered="local")
add("flow/capture", lambda c, m: flow.capture(m, c.other.clean), steered="local")
add(
    "lens/logit_lens",
    lambda c, m: lens.logit_lens(m, c.prompts.clean, position=4, index=2, k=3, target=int(c.prompts.answer[2])),
    steered="local",
)
add("lens/head_projection", lambda c, m: lens.head_projection(m, c.prompts.clean, 1, 2, k=5), steered="local")
add(
    "circuits/discover",
    lambda c, m: circuits.discover(m, c.prompts, roles=False, **DISCOVER),
    steered="bug",
)
