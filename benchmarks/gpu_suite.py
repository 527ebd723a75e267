"""The GPU suite: smoke, calibration, parity on CUDA, then times and peak memory of varkernels and its peers.

    bash benchmarks/gpu_suite.sh                      # on the lent GPU: every stage, within --budget-s
    bash benchmarks/gpu_suite.sh --resume             # after a budget stop: the same run, from the next case
    bash benchmarks/gpu_suite.sh --smoke              # the first minute only: does the image run the kernels?
    bash benchmarks/gpu_suite.sh --dry-run            # any machine: imports and the staged plan, no GPU touched
    bash benchmarks/gpu_suite.sh --wheels /data/whl   # peers (liger-kernel, cut-cross-entropy) from wheel files

Written for one short run on a lent GPU whose image is fixed (an H200: Python 3.12, torch 2.11, triton 3.6, no
network, no install step, at most 10 minutes per command): nothing is installed, peers come from ``--wheels DIR``
(pure-Python wheels unpacked into a temporary folder and put on ``sys.path``) or their rows are skipped with the
reason; providers that need a newer torch (``F.linear_cross_entropy``, torch >= 2.13) are skipped with the reason.

Stages, in order (``--stages`` picks some; each has a budget and an estimate, ``--dry-run`` prints both):

smoke        one case per kernel on CUDA (the weight-gradient GEMM's CUDA branch, the single-pass and the tiled
             token kernel, the log-prob modes, the fused-linear driver with the weights and scaling kernels) and
             one timing: does this image run the kernels at all (≤ 60 s)
calibrate    the device's peak rates, measured (~10 s): a bf16 8192³ GEMM and a 2 GiB device copy; every
             roofline estimate of the timing stages is computed against them (and against the datasheet)
parity       every Triton path against ``varkernels.reference`` on CUDA, with the tolerance policy of the tests
             plus the derived term for the GPU's approximate exp2 (docs/design.md §4.6); the first case is the
             CUDA branch of the weight-gradient GEMM (``addmm(..., out_dtype=float32, out=gw)``); a mismatch
             stops the suite (exit status 1) before anything is timed (≤ 3 min with JIT)
time-llama3  fused-linear VAR loss, forward + backward, Llama-3-8B head (H=4096, V=128256), 16k tokens, bf16
time-gemma2  the same at the Gemma-2-2B head (H=2304, V=256000), 8k tokens (the shape of Cut Cross-Entropy's
             Table 1)
time-logits  the logits-form loss, V=128256, 16k tokens, bf16

Each timing case is one provider at one shape: ``triton.testing.do_bench`` (median, p20, p80 over ``rep`` ms
after ``warmup`` ms; ``rep`` sized from the stage's budget) and ``torch.cuda.max_memory_allocated`` beyond the
inputs during one call, gradients included; a provider that runs out of memory gets a row with status "oom".
Inputs are generated on the device (tools/peers.py ``make_inputs``).

Budget and resume: before each case the suite checks that the elapsed time plus the case's estimate fits
``--budget-s`` (default 540 s, under the 10-minute limit of one command); if not, it stops between cases with exit
status 3 and prints the command that resumes. Every case appends its CSV row(s) when it finishes (column ``case``
names it); ``--resume [RUN]`` reuses run RUN (default: the last run in the CSV) and skips the cases it has.

Output: rows in benchmarks/results/gpu_suite.csv (run id, GPU, versions, load average, THP state), a plot
benchmarks/results/gpu_suite.png and a table with the roofline ESTIMATE (tools.costmodel, traced at
the case's shape) beside each measured time, against the measured peaks (``est_ms``) and the datasheet
(``est_datasheet_ms``). ``--fake`` runs the plan's control flow (budget, CSV, resume) without a GPU: every case
"takes" its estimate on a virtual clock and writes a row with status "fake" (for tests/test_gpu_suite.py; never
a measurement). No GPU time has been measured by this project yet.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _harness import append_csv, arg_parser, git_revision, load_average, read_rows, run_id, thp_mode  # noqa: E402

from tools.gpu_estimates import calibrated_gpu  # noqa: E402
from tools.gpu_parity import case_label, parity_cases, parity_one, smoke_parity_cases  # noqa: E402  (puts tests/ on sys.path)
from tools.peers import selected  # noqa: E402

RESULTS = HERE / "results"
CSV = RESULTS / "gpu_suite.csv"
FAKE_CSV = RESULTS / "local" / "gpu_suite_fake.csv"  # git-ignored: --fake rows are never measurements
PLOT = RESULTS / "gpu_suite.png"
ROOFLINE_CSV = RESULTS / "cost_model.csv"

HEADS = {"llama3-8b": (4096, 128256), "gemma2-2b": (2304, 256000)}  # name: (H, V)
SEQUENCES = 8  # B: rows of the B×B reward / reference matrices; T = tokens / B
DEFAULT_EXCLUDED = ("torch.compile(naive)", "cce[torch_compile]")  # compile time: minutes at these shapes

STAGES = ("smoke", "calibrate", "parity", "time-llama3", "time-gemma2", "time-logits")
STAGE_BUDGET_S = {"smoke": 60, "calibrate": 15, "parity": 180, "time-llama3": 100, "time-gemma2": 80,
                  "time-logits": 45}
TIMING_STAGES = {  # stage: (form, head, tokens)
    "time-llama3": ("linear", "llama3-8b", 16384),
    "time-gemma2": ("linear", "gemma2-2b", 8192),
    "time-logits": ("logits", "llama3-8b", 16384),
}
SUITE_TARGET_S = 480  # the whole suite, by the plan, start-up included
DEFAULT_BUDGET_S = 540  # one command: under the lent machine's 10-minute limit
STARTUP_S = 20  # planned: interpreter, torch / triton / varkernels imports, CUDA context
# Planning constants (seconds): what a case costs beyond its kernels' time. JIT: one Triton compilation (host
# CPU); the parity stage compiles each kernel specialization once. PARITY_RUN_S: one parity case's reference
# runs (fp32 and fp64 on the device) and checks. SETUP_*: a timing case's first call (compilation, autotuning)
# and its cost-model trace (host CPU, fake tensors). None of these has been measured on a GPU yet.
JIT_S = 2.0
PARITY_RUN_S = 0.4
SETUP_TRITON_S = 4.0
SETUP_EAGER_S = 1.0
COMPILE_S = 60.0  # torch.compile(naive), cce[torch_compile]: inductor at one large shape (only with --providers)
TRACE_S = 1.0
# Per-call times for the plan: the committed cost-model ESTIMATE for the H100 SXM datasheet, times
# 989/790 (an H200's measured bf16 GEMM rate against the datasheet) times 1.5, a margin (at the published
# points of tests/test_cost_model_calibration.py measured/estimated is 0.98-1.14; launch latency and small
# GEMMs, not modelled, weigh more at other shapes).
PLAN_SLOWDOWN = 989 / 790 * 1.5
CALIBRATE_GEMM_N = 8192
CALIBRATE_COPY_BYTES = 2 * 2**30
CALIBRATE_REP_MS = 3000
REP_MIN_MS, REP_MAX_MS, WARMUP_MS = 100, 1000, 25

FIELDS = [
    "run", "date", "case", "stage", "gpu", "arch", "torch", "triton", "varkernels", "liger_kernel",
    "cut_cross_entropy", "revision", "wheels", "load_1min", "thp", "part", "form", "provider", "head", "B", "T",
    "tokens", "H", "V", "dtype", "status", "reason", "median_ms", "p20_ms", "p80_ms", "peak_extra_bytes",
    "rate", "rate_unit", "est_ms", "est_datasheet_ms", "est_source", "warmup_ms", "rep_ms",
]


# ----------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class Case:
    """One unit of work: it runs whole or not at all, and appends its CSV row(s) when done."""

    stage: str
    key: str  # unique in the suite: the CSV column ``case``, what --resume skips
    kind: str  # "parity" | "time" | "calibrate" | "skip"
    est_s: float  # planned seconds, compilation and set-up included
    spec: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float
    cases: list
    note: str = ""

    @property
    def est_s(self) -> float:
        return sum(c.est_s for c in self.cases)


def _jit_keys(op, dt, shape, opts) -> set:
    """The Triton specializations a parity case launches (approximately what the launchers key their compiled
    kernels on: the token kernel picked by ``token_kernel_config`` with its BLOCK_V and num_warps, the mode —
    VAR gradient in the forward, log-probs without gradient, gradient from a saved logsumexp — and softcap;
    the VAR-weights and scaling kernels). cuBLAS GEMMs compile nothing."""
    import torch

    from varkernels.core._triton_kernels import token_kernel_config

    if op == "weight_grad_gemm":
        return set()
    softcap = opts.get("softcap")
    kernel, block, nw = token_kernel_config(shape["V"], getattr(torch, dt), softcap=softcap)
    token = (dt, getattr(kernel, "fn", kernel).__name__, block, nw, bool(softcap))
    if op == "sequence_logps":
        modes = ("logps_fwd", "logps_bwd")
    elif op == "token_kernel":
        modes = ("logps_fwd", "logps_bwd") if opts["mode"] == "logps_bwd" else (opts["mode"],)
    else:
        modes = ("var",)
    keys = {(*token, m) for m in modes}
    if op in ("fused_var_loss", "fused_linear_var_loss"):
        keys |= {("var_weights",), ("scale", dt)}
    return keys


def parity_estimates(cases, seen=None) -> list:
    """Planned seconds of each parity case: PARITY_RUN_S, plus JIT_S per specialization it compiles first
    (``seen``: the specializations compiled before, e.g. by the smoke stage of the same plan)."""
    seen = set() if seen is None else seen
    out = []
    for c in cases:
        new = _jit_keys(*c) - seen
        out.append(PARITY_RUN_S + JIT_S * len(new))
        seen |= new
    return out


def select_providers(all_names, wanted) -> list:
    if wanted == ["all"]:
        return list(all_names)
    if not wanted:
        return [n for n in all_names if n not in DEFAULT_EXCLUDED]
    return [n for n in all_names if selected(n, wanted, all_names)]


def planned_call_ms(rows, provider, form, head, tokens) -> float:
    """The plan's per-call time of one provider: the committed cost-model estimate for the H100 SXM datasheet
    times PLAN_SLOWDOWN; without a row (a provider the model does not cover), the slowest row of that shape."""
    same = [r for r in rows if r.get("gpu") == "H100 SXM" and r.get("head") == head and r.get("form") == form
            and str(r.get("tokens")) == str(tokens) and r.get("weights", "bf16") == "bf16"]
    mine = [float(r["est_ms"]) for r in same if r.get("provider") == provider]
    if mine:
        return mine[0] * PLAN_SLOWDOWN
    if same:
        return max(float(r["est_ms"]) for r in same) * PLAN_SLOWDOWN
    H, V = HEADS[head]
    flops = 3 * 2 * tokens * H * V if form == "linear" else 0
    return max(flops / 790e12, 5 * tokens * V * 2 / 4.3e12) * 1e3 * PLAN_SLOWDOWN


def timing_case_s(call_ms: float, uses_triton: bool, warmup_ms: float, rep_ms: float, compiles: bool = False) -> float:
    """Planned seconds of one timing case: set-up (first call, trace of the estimate), two calls for the memory
    peak, do_bench's five estimation calls, then max(1, warmup / t) + max(1, rep / t) calls."""
    t = call_ms / 1e3
    setup = (SETUP_TRITON_S if uses_triton else SETUP_EAGER_S) + TRACE_S + (COMPILE_S if compiles else 0.0)
    n_warm = max(1, int(warmup_ms / call_ms))
    n_rep = max(1, int(rep_ms / call_ms))
    return setup + t * (1 + 2 + 5 + n_warm + n_rep)


def rep_for_stage(budget_s: float, calls_ms: list, triton_flags: list, warmup_ms: float, cap_ms: float) -> int:
    """do_bench's ``rep`` (ms) for a timing stage: what is left of 80% of its budget after the fixed costs,
    shared by its cases, between REP_MIN_MS and ``cap_ms``."""
    if not calls_ms:
        return int(cap_ms)
    fixed = sum(timing_case_s(t, u, warmup_ms, 0.0) for t, u in zip(calls_ms, triton_flags))
    per_case_ms = (0.8 * budget_s - fixed) / len(calls_ms) * 1e3 - warmup_ms
    return int(min(cap_ms, max(REP_MIN_MS, per_case_ms)))


def _providers_for(form, args):
    from tools.peers import get_providers

    everyone = get_providers(form, "cuda")
    names = select_providers([p.name for p in everyone], args.providers)
    for p in everyone:
        if p.skip and "is not importable here" in p.skip:
            base = p.skip.split("; pip install it")[0]
            hint = (f"no wheel for it in --wheels {args.wheels}" if args.wheels
                    else "not in this image and no --wheels DIR given (no install step, no network)")
            p.skip = f"{base}; {hint}"
    return [p for p in everyone if p.name in names], [p for p in everyone if p.name not in names]


def build_plan(args) -> list:
    """The stages to run, with their cases and estimates (see the module docstring)."""
    stages = []
    rows = read_rows(ROOFLINE_CSV)
    compiled = set()  # Triton specializations compiled by the stages before (the in-process and on-disk caches)
    for name in args.stages:
        if name == "smoke":
            cases = smoke_parity_cases()
            est = parity_estimates(cases, compiled)
            cs = [Case("smoke", "smoke:" + case_label(*c), "parity", e, dict(case=c)) for c, e in zip(cases, est)]
            H, V = HEADS["llama3-8b"]
            t = planned_call_ms(rows, "varkernels[triton]", "linear", "llama3-8b", 16384) / 4
            cs.append(Case("smoke", "smoke:time varkernels[triton] linear llama3-8b tokens=4096", "time",
                           timing_case_s(t, True, WARMUP_MS, REP_MIN_MS),
                           dict(form="linear", head="llama3-8b", tokens=4096, provider="varkernels[triton]",
                                warmup_ms=WARMUP_MS, rep_ms=REP_MIN_MS, call_ms=t)))
            stages.append(Stage("smoke", STAGE_BUDGET_S["smoke"], cs, "one case per kernel on CUDA, one timing"))
        elif name == "calibrate":
            gemm_s = 2 * CALIBRATE_GEMM_N**3 / 790e12
            est = 2 * (CALIBRATE_REP_MS + 200) / 1e3 + 2.0 + 6 * gemm_s
            stages.append(Stage("calibrate", STAGE_BUDGET_S["calibrate"],
                                [Case("calibrate", "calibrate:bf16 GEMM + device copy", "calibrate", est)],
                                f"bf16 {CALIBRATE_GEMM_N}^3 GEMM and a {CALIBRATE_COPY_BYTES >> 30} GiB device copy"))
        elif name == "parity":
            cases = parity_cases()
            est = parity_estimates(cases, compiled)
            cs = [Case("parity", "parity:" + case_label(*c), "parity", e, dict(case=c)) for c, e in zip(cases, est)]
            stages.append(Stage("parity", STAGE_BUDGET_S["parity"], cs, "every Triton path against the reference"))
        else:
            form, head, tokens = TIMING_STAGES[name]
            H, V = HEADS[head]
            providers, unselected = _providers_for(form, args)
            runnable = [p for p in providers if p.runnable]
            calls = [planned_call_ms(rows, p.name, form, head, tokens) for p in runnable]
            flags = [p.uses_triton for p in runnable]
            rep = args.rep if args.rep else rep_for_stage(STAGE_BUDGET_S[name], calls, flags, args.warmup,
                                                          REP_MAX_MS)
            cs = []
            for p in providers:
                key = f"{name}:{p.name} {form} {head} tokens={tokens} bfloat16"
                spec = dict(form=form, head=head, tokens=tokens, provider=p.name, warmup_ms=args.warmup, rep_ms=rep)
                if not p.runnable:
                    cs.append(Case(name, key, "skip", 0.0, {**spec, "reason": p.skip}))
                    continue
                t = planned_call_ms(rows, p.name, form, head, tokens)
                cs.append(Case(name, key, "time", timing_case_s(t, p.uses_triton, args.warmup, rep,
                                                                p.name in DEFAULT_EXCLUDED),
                               {**spec, "call_ms": t}))
            note = (f"{form} H={H if form == 'linear' else '-'} V={V} tokens={tokens} bf16, do_bench(warmup="
                    f"{args.warmup} ms, rep={rep} ms)"
                    + (f"; not selected: {', '.join(p.name for p in unselected)}" if unselected else ""))
            stages.append(Stage(name, STAGE_BUDGET_S[name], cs, note))
    return stages


def print_plan(stages, args, out=print) -> float:
    """The plan with each stage's estimate and budget; returns the total estimate (start-up included)."""
    total = STARTUP_S + sum(s.est_s for s in stages)
    out(f"plan: {len(stages)} stages, estimated {total:.0f} s in all (start-up {STARTUP_S} s included; "
        f"target {SUITE_TARGET_S} s, --budget-s {args.budget_s:.0f} s); estimates, not measurements")
    for i, s in enumerate(stages, 1):
        fits = "ok" if s.est_s <= s.budget_s else "OVER BUDGET"
        out(f"{i}. {s.name:12s} est. {s.est_s:6.1f} s  budget {s.budget_s:4.0f} s  [{fits}]  "
            f"{len(s.cases)} cases: {s.note}")
        for c in s.cases:
            what = f"skipped: {c.spec['reason']}" if c.kind == "skip" else f"est. {c.est_s:5.1f} s"
            out(f"      {c.key.split(':', 1)[1]:70s} {what}")
    verdict = "fits" if total <= SUITE_TARGET_S else "does NOT fit"
    out(f"total: est. {total:.0f} s: {verdict} the {SUITE_TARGET_S} s target")
    return total


# ----------------------------------------------------------------------------------------------
# calibration, timings, estimates


def calibrate_device() -> list:
    """The device's bf16 GEMM rate and copy bandwidth, measured: rows for the CSV (rate in FLOP/s, bytes/s)."""
    import torch
    import triton

    def bench(fn, *ts):  # the operands are freed when it returns
        return triton.testing.do_bench(lambda: fn(*ts), warmup=200, rep=CALIBRATE_REP_MS, quantiles=[0.5, 0.2, 0.8])

    n = CALIBRATE_GEMM_N
    gemm = bench(lambda a, b, c: torch.mm(a, b, out=c),
                 *(torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(3)))
    src = torch.empty(CALIBRATE_COPY_BYTES // 4, device="cuda", dtype=torch.float32).normal_()
    copy = bench(lambda s, d: d.copy_(s), src, torch.empty_like(src))
    src = None
    torch.cuda.empty_cache()
    flops, moved = 2.0 * n**3, 2.0 * CALIBRATE_COPY_BYTES
    return [
        {"part": "calibrate", "provider": f"torch.mm bf16 {n}^3", "dtype": "bfloat16", "status": "ok",
         "median_ms": f"{gemm[0]:.6g}", "p20_ms": f"{gemm[1]:.6g}", "p80_ms": f"{gemm[2]:.6g}",
         "rate": f"{flops / (gemm[0] * 1e-3):.6g}", "rate_unit": "FLOP/s"},
        {"part": "calibrate", "provider": f"copy_ {CALIBRATE_COPY_BYTES >> 30} GiB fp32", "dtype": "float32",
         "status": "ok", "median_ms": f"{copy[0]:.6g}", "p20_ms": f"{copy[1]:.6g}", "p80_ms": f"{copy[2]:.6g}",
         "rate": f"{moved / (copy[0] * 1e-3):.6g}", "rate_unit": "bytes/s (read + write)"},
    ]


_TRACES = {}


def estimate_ms(provider, form, head, tokens, gpus) -> tuple:
    """Roofline ESTIMATES (ms) of one provider at one shape, traced by tools/cost_providers.py for each GPU of
    ``gpus`` (None entries give None), and the source; (None, ..., reason) when the model cannot trace it here."""
    key = (provider, form, head, tokens)
    if key not in _TRACES:
        try:
            from tools import cost_providers

            fn = next((f for fm, name, f in cost_providers.PROVIDERS if fm == form and name == provider), None)
            _TRACES[key] = None if fn is None else fn(cost_providers.Case(head, tokens, False))
            _TRACES[key, "why"] = "no cost-model provider of that name" if fn is None else "cost model (traced)"
        except Exception as e:  # noqa: BLE001 - an estimate is optional; the measurement is not
            _TRACES[key] = None
            _TRACES[key, "why"] = f"cost model failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    tr = _TRACES[key]
    if tr is None:
        return (*[None] * len(gpus), _TRACES[key, "why"])
    return (*[None if g is None else tr.estimate_seconds(g) * 1e3 for g in gpus], _TRACES[key, "why"])


def _bench(fn, reset, warmup, rep):
    """do_bench quantiles of ``fn`` and its peak memory beyond what is allocated before a call (after a warm-up
    call, whose compilation / autotuning buffers are not counted; the previous call's gradients are dropped by
    ``reset`` first, so the new ones count)."""
    import torch
    import triton

    fn()
    reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_extra_bytes=peak)


class Runner:
    """Runs the cases of a plan on CUDA (or, with ``fake``, on a virtual clock), appending rows as it goes."""

    def __init__(self, args, base_row, done_rows, fake=False, device="cuda"):
        self.args, self.base_row, self.fake = args, base_row, fake
        self.device = device  # "cpu" only in tests/test_gpu_suite.py (the interpreter; _bench replaced)
        self.csv = Path(args.csv)
        self.virtual_s = 0.0
        self.gpu, self.sheet = (None, None) if fake else calibrated_gpu(done_rows, base_row["gpu"])
        self.inputs = {}

    def elapsed(self) -> float:
        return (STARTUP_S + self.virtual_s) if self.fake else time.perf_counter() - T_START

    def write(self, case, rows) -> list:
        rows = [{**self.base_row, "case": case.key, "stage": case.stage, "load_1min": f"{load_average():.2f}", **r}
                for r in rows]
        append_csv(self.csv, rows, fields=FIELDS)
        return rows

    def run(self, case) -> list:
        if self.fake:
            self.virtual_s += case.est_s
            status = "skipped" if case.kind == "skip" else "fake"
            return self.write(case, [{"part": case.kind, "status": status, "reason": case.spec.get("reason", "")}])
        if case.kind == "calibrate":
            rows = self.write(case, calibrate_device())
            self.gpu, self.sheet = calibrated_gpu(rows, self.base_row["gpu"])
            for r in rows:
                print(f"   {r['provider']:28s} {float(r['median_ms']):8.3f} ms  {float(r['rate']) / 1e12:7.2f} T"
                      f"{r['rate_unit']}")
            return rows
        if case.kind == "parity":
            return self.run_parity(case)
        return self.run_time(case)

    def run_parity(self, case) -> list:
        op, dt, shape, opts = case.spec["case"]
        try:
            parity_one(op, dt, shape, opts, device=self.device)
        except AssertionError as e:
            print(f"   MISMATCH {case_label(op, dt, shape, opts)}\n{e}")
            return self.write(case, [{"part": "parity", "dtype": dt, "status": "mismatch",
                                      "reason": str(e).splitlines()[0][:300]}])
        except Exception as e:  # noqa: BLE001 - an error in a Triton path is a parity failure as well
            traceback.print_exc()
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            return self.write(case, [{"part": "parity", "dtype": dt, "status": "failed",
                                      "reason": f"{type(e).__name__}: {msg}"}])
        print(f"   ok {case_label(op, dt, shape, opts)}")
        return self.write(case, [{"part": "parity", "dtype": dt, "status": "ok"}])

    def run_time(self, case) -> list:
        import torch

        from tools.peers import get_providers, make_inputs

        sp = case.spec
        form, head, tokens = sp["form"], sp["head"], sp["tokens"]
        H, V = HEADS[head]
        B, T = SEQUENCES, tokens // SEQUENCES
        row = {"part": "time", "form": form, "provider": sp["provider"], "head": head, "B": B, "T": T,
               "tokens": tokens, "H": H if form == "linear" else "", "V": V, "dtype": "bfloat16",
               "warmup_ms": sp["warmup_ms"], "rep_ms": sp["rep_ms"]}
        est, sheet_est, src = estimate_ms(sp["provider"], form, head, tokens, [self.gpu, self.sheet])
        row.update(est_ms="" if est is None else f"{est:.4g}",
                   est_datasheet_ms="" if sheet_est is None else f"{sheet_est:.4g}",
                   est_source=f"{src}; measured peaks" if est is not None else
                   (f"{src}; datasheet {self.sheet.name} only (no calibration in this run)"
                    if sheet_est is not None else src))
        if case.kind == "skip":
            print(f"   {sp['provider']:28s} skipped: {sp['reason']}")
            return self.write(case, [{**row, "status": "skipped", "reason": sp["reason"]}])
        p = next(p for p in get_providers(form, self.device) if p.name == sp["provider"])
        shape_key = (form, head, tokens)
        if shape_key not in self.inputs:
            self.inputs.clear()
            torch.cuda.empty_cache()  # a no-op where CUDA is not initialised (the CPU tests)
            self.inputs[shape_key] = make_inputs(form, B, T, V, torch.bfloat16, self.device, H=H)
        x = self.inputs[shape_key]
        xi = x.clone() if p.overwrites_input else x

        def step():
            xi.zero_grad()
            p.loss(xi).backward()

        try:
            m = _bench(step, xi.zero_grad, sp["warmup_ms"], sp["rep_ms"])
        except torch.cuda.OutOfMemoryError as e:
            out = {**row, "status": "oom", "reason": str(e).splitlines()[0][:200]}
            print(f"   {p.name:28s} out of memory")
        except Exception as e:  # noqa: BLE001 - a provider failing at one size is a row, not a crash
            out = {**row, "status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"   {p.name:28s} failed: {type(e).__name__}: {e}")
        else:
            out = {**row, "status": "ok", **{k: f"{v:.6g}" for k, v in m.items()}}
            ratio = f"{m['median_ms'] / est:.2f}" if est else "n/a"
            print(f"   {p.name:28s} {m['median_ms']:9.2f} ms (p20-p80 {m['p20_ms']:.2f}-{m['p80_ms']:.2f}) "
                  f"peak +{m['peak_extra_bytes'] / 1e9:.2f} GB  est. {row['est_ms'] or 'n/a'} ms  meas/est {ratio}")
        finally:
            xi.zero_grad()
            xi = None
            torch.cuda.empty_cache()  # a no-op where CUDA is not initialised (the CPU tests)
        return self.write(case, [out])



# ----------------------------------------------------------------------------------------------
# output


def table(rows) -> str:
    """The printed table: measured time and memory, with the roofline ESTIMATES beside the time (against the
    measured peaks, and the datasheet)."""
    head = (f"{'form':6s} {'head':10s} {'tokens':>6s} {'provider':28s} {'median ms':>10s} {'p20-p80 ms':>15s} "
            f"{'peak GB':>8s} {'est. ms':>9s} {'meas/est':>8s} {'sheet ms':>9s}")
    out = [head, "-" * len(head)]
    for r in rows:
        if r.get("part") != "time":
            continue
        est, sheet = r.get("est_ms") or "n/a", r.get("est_datasheet_ms") or "n/a"
        if r["status"] != "ok":
            out.append(f"{r['form']:6s} {r['head']:10s} {r['tokens']:>6} {r['provider']:28s} "
                       f"{r['status']:>10s} {'':>15s} {'':>8s} {est:>9s} {'':>8s} {sheet:>9s}")
            continue
        med = float(r["median_ms"])
        ratio = f"{med / float(r['est_ms']):.2f}" if r.get("est_ms") else "n/a"
        out.append(f"{r['form']:6s} {r['head']:10s} {r['tokens']:>6} {r['provider']:28s} "
                   f"{med:10.2f} {float(r['p20_ms']):7.2f}-{float(r['p80_ms']):<7.2f} "
                   f"{float(r['peak_extra_bytes']) / 1e9:8.2f} {est:>9s} {ratio:>8s} {sheet:>9s}")
    out.append("(est. ms: roofline ESTIMATE of the cost model against this device's measured peaks; sheet ms: "
               "against its datasheet; estimates, not measurements)")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    """Time and peak memory of the run's ok timing rows, one bar per provider (benchmarks/plot.py's bars)."""
    try:
        import plot as plots
    except SystemExit:  # matplotlib is not part of every GPU image; the CSV is what matters
        print(f"matplotlib is not installed here: no plot ({path}); the CSV has every figure")
        return
    ok = [r for r in rows if r.get("part") == "time" and r["status"] == "ok"]
    if not ok:
        return

    def label(r):
        return f"{r['form']}\n{r['head']}\n{r['tokens']} tok {r['dtype']}"

    fig, axes = plots.plt.subplots(2, 1, figsize=(max(8, 1.6 * len({label(r) for r in ok})), 8))
    plots.grouped_bars(axes[0], ok, lambda r: float(r["median_ms"]), log=True, label=label,
                       err=lambda r: (float(r["p20_ms"]), float(r["p80_ms"])),
                       ylabel="forward + backward, ms (do_bench median, p20-p80)")
    plots.grouped_bars(axes[1], ok, lambda r: max(float(r["peak_extra_bytes"]), 1.0) / 1e9, log=True, label=label,
                       ylabel="peak memory beyond inputs, GB")
    axes[0].legend(**plots.LEGEND)
    axes[0].set_title(f"GPU suite, {ok[0]['gpu']} (measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plots.plt.close(fig)


def add_wheels(folder: str) -> list:
    """Put the pure-Python wheels of ``folder`` on sys.path (no install, no network): each ``*.whl`` is unpacked
    once into a temporary folder (a wheel is a zip of the package and its .dist-info, so importlib.metadata
    finds its version). Returns the wheel file names. Wheels with compiled code for another Python are not
    importable this way; their providers then skip with the import error."""
    import tempfile
    import zipfile

    wheels = sorted(Path(folder).glob("*.whl"))
    if not Path(folder).is_dir():
        raise SystemExit(f"gpu_suite: --wheels {folder}: not a folder")
    cache = Path(tempfile.gettempdir()) / "varkernels_gpu_suite_wheels"
    for whl in wheels:
        dest = cache / whl.stem
        if not (dest / ".complete").exists():
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl) as z:
                z.extractall(dest)
            (dest / ".complete").write_text("")
        sys.path.insert(0, str(dest))
    os.environ["PYTHONPATH"] = os.pathsep.join([*(str(cache / w.stem) for w in wheels),
                                                os.environ.get("PYTHONPATH", "")])
    return [w.name for w in wheels]


# ----------------------------------------------------------------------------------------------


def dry_run(args) -> int:
    """Imports and the staged plan; touches no GPU and writes nothing."""
    import test_single_pass  # noqa: F401  (the token-kernel launcher and checks of the parity stage)
    import torch
    import triton
    from helpers import assert_close  # noqa: F401

    import tools.cost_providers  # noqa: F401  (the estimates of the timing stages)
    import varkernels  # noqa: F401
    from tools.peers import peer_versions
    from varkernels import fused_linear_var_loss, fused_var_loss, sequence_logps  # noqa: F401
    from varkernels.core import _triton_kernels as K
    from varkernels.reference import var_loss_reference  # noqa: F401

    print(f"gpu_suite --dry-run: imports ok (python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"triton {triton.__version__}, " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()) + ")")
    print("   no GPU is touched and nothing is written in a dry run"
          + (f"; wheels on sys.path: {', '.join(args.wheel_names) or 'none found'}" if args.wheels else ""))
    for V in (1000, 16003, 32003, 128256):
        kernel, block, nw = K.token_kernel_config(V, torch.bfloat16)
        print(f"   bf16 V={V}: token kernel {getattr(kernel, 'fn', kernel).__name__} BLOCK_V={block} num_warps={nw}")
    print()
    stages = build_plan(args)
    print_plan(stages, args)
    print(f"\noutput: {args.csv} (rows, appended as each case ends), {args.plot} (plot), a printed table")
    print(f"CUDA available here: {torch.cuda.is_available()} (a real run needs it)")
    return 0


def main(argv=None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="check imports and print the plan; no GPU, no output")
    p.add_argument("--smoke", action="store_true", help="the smoke stage only (same as --stages smoke)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="stop between cases before this many seconds from start (default %(default)s)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="RUN",
                   help="continue run RUN (default: the last run in the CSV), skipping the cases it has")
    p.add_argument("--wheels", default=None, metavar="DIR", help="folder of peer wheels to put on sys.path")
    p.add_argument("--providers", nargs="*", default=None,
                   help='exact names or substrings; "all" for every provider (default: all but '
                        + ", ".join(DEFAULT_EXCLUDED) + ")")
    p.add_argument("--warmup", type=int, default=WARMUP_MS, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=None,
                   help="do_bench measuring time, ms (default: sized from each timing stage's budget)")
    p.add_argument("--fake", action="store_true",
                   help="no GPU: run the plan's control flow on a virtual clock, rows with status 'fake' "
                        "(tests only; default CSV under benchmarks/results/local/)")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=str(PLOT))
    args = p.parse_args(argv)
    if args.smoke:
        args.stages = ["smoke"]
    args.stages = [s for s in STAGES if s in args.stages]
    args.csv = args.csv or str(FAKE_CSV if args.fake else CSV)
    args.wheel_names = add_wheels(args.wheels) if args.wheels else []
    if args.dry_run:
        return dry_run(args)

    if not args.fake:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("gpu_suite: TRITON_INTERPRET=1 is set: the Triton kernels would run in the interpreter, and their "
                  "times would measure it; unset it for a GPU run", file=sys.stderr)
            return 2
    import torch
    import triton

    if not args.fake and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "--dry-run for the plan", file=sys.stderr)
        return 2
    from tools.peers import peer_versions

    csv_path = Path(args.csv)
    old = read_rows(csv_path)
    if args.resume:
        runs = list(dict.fromkeys(r["run"] for r in old))
        run = runs[-1] if (args.resume == "last" and runs) else args.resume
        if run not in runs:
            print(f"gpu_suite: --resume: no run {run!r} in {csv_path}", file=sys.stderr)
            return 2
        mine = [r for r in old if r["run"] == run]
        if any(r.get("part") == "parity" and r.get("status") in ("mismatch", "failed") for r in mine):
            print(f"gpu_suite: run {run} stopped on a parity mismatch; nothing more is run for it", file=sys.stderr)
            return 1
        done = {r["case"] for r in mine}
    else:
        run = run_id()
        mine, done = [], set()
    if args.fake:
        gpu, arch = "fake (no GPU: --fake)", "-"
    else:
        cap = torch.cuda.get_device_capability()
        gpu, arch = torch.cuda.get_device_name(), f"sm_{cap[0]}{cap[1]}"
    base_row = {"run": run, "date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "arch": arch,
                "torch": torch.__version__, "triton": triton.__version__, **peer_versions(),
                "revision": git_revision(), "wheels": " ".join(args.wheel_names), "thp": thp_mode()}
    print(f"gpu_suite run {run}{' (resumed)' if args.resume else ''}: {gpu} ({arch}), torch {torch.__version__}, "
          f"triton {triton.__version__}, budget {args.budget_s:.0f} s")
    stages = build_plan(args)
    print_plan(stages, args)
    runner = Runner(args, base_row, mine, fake=args.fake)
    status = 0
    for stage in stages:
        todo = [c for c in stage.cases if c.key not in done]
        if not todo:
            continue
        print(f"\n== {stage.name}: {len(todo)} cases (est. {sum(c.est_s for c in todo):.0f} s): {stage.note}")
        for case in todo:
            if runner.elapsed() + case.est_s > args.budget_s:
                print(f"\ngpu_suite: budget: stopped before {case.key} (elapsed {runner.elapsed():.0f} s + its "
                      f"estimate {case.est_s:.0f} s > --budget-s {args.budget_s:.0f}); rows so far are in "
                      f"{csv_path}. Resume with:\n    bash benchmarks/gpu_suite.sh --resume {run}"
                      + (f" --wheels {args.wheels}" if args.wheels else ""))
                status = 3
                break
            rows = runner.run(case)
            if case.kind == "parity" and rows[0]["status"] in ("mismatch", "failed"):
                print(f"gpu_suite: stopped: a Triton path disagrees with the reference on CUDA ({case.key}); "
                      f"nothing is timed", file=sys.stderr)
                return 1
        if status:
            break
    rows = [r for r in read_rows(csv_path) if r["run"] == run]
    if not args.fake and any(r.get("part") == "time" for r in rows):
        plot(rows, Path(args.plot))
        print("\n" + table(rows))
    print(f"\n{len(rows)} rows of run {run} in {csv_path} ({runner.elapsed():.0f} s"
          f"{' on the virtual clock' if args.fake else ''}); send that file back")
    return status


if __name__ == "__main__":
    sys.exit(main())
