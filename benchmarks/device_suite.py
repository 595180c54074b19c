"""Every accelerator figure of the project in one command: the device's floor, glm4-jax on random full-size
glm-4-9b-chat weights (bf16, int8, int4, long context), transformers on the same weights, and full-size parity.

    python benchmarks/device_suite.py --out suite-out            # one H200 / H100: about 9 minutes, compiles included
    python benchmarks/device_suite.py --out /tmp/s --tiny        # every part end to end on the CPU, small shapes
    python benchmarks/device_suite.py --out s --parts floor,jax_bf16

Each part runs in its own process under its own time budget (seconds, scaled by `--budget-scale`), so a part that
fails, runs out of memory or out of time loses nothing that the parts before it measured. After each part the
results so far are written to OUT/results.json and OUT/results.md; OUT/suite.log collects every part's output.

Parts (in order):
  floor     device-to-device copy GB/s (bytes read + written) and bf16 matmul TFLOP/s, measured through JAX
  jax_bf16  decode 1x128 and 64x1024 (batch x prompt, 128 new tokens), prefill 8192: tok/s, ms/step, GB/s and its
            share of the measured copy floor, compile s of each first call, peak device memory
  jax_int8  decode 1x128 with int8 weights (Config.quant), the same columns
  jax_int4  decode 1x128 with int4 weights
  qmatmul   one batch-1 matmul on int8 / int4 weights (the gate and down matrices, group 128): the XLA path of
            glm4_jax/qmatmul.py against the Pallas kernel of glm4_jax/qkernel.py (on a CPU: interpret mode), ms
            and weight GB/s of each, whether qmatmul.linear takes the kernel here, and their largest difference
  jax_long  decode at batch 1 with 131,072 tokens of context (prompt 130,944 + 128 new), whose prefill is the long
            prefill figure
  hf        transformers GlmForCausalLM with the same random weights (static cache, torch.compile): decode 1x128,
            64x1024, prefill 8192; and the ratio glm4-jax / transformers of each
  parity    bf16, the same weights in both: greedy ids over 64 new tokens after a 128-token prompt, top-1
            agreement and max / mean KL(transformers || glm4-jax) of the next-token distributions over a 512-token
            prompt

Needs only what the device image holds (jax, torch, transformers); the project by `pip install --no-deps -e .` or
PYTHONPATH. Random weights come from `glm4_jax.placement.random_model` (made in place, about 1.0x the weight bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent

# name -> time budget in seconds on the device (the whole suite fits in 9 minutes)
BUDGETS = {
    "floor": 30,
    "jax_bf16": 110,
    "jax_int8": 55,
    "jax_int4": 55,
    "qmatmul": 40,
    "jax_long": 90,
    "hf": 100,
    "parity": 75,
}
TINY_BUDGET = 300  # each part, on a loaded CPU


@dataclasses.dataclass(frozen=True)
class Shapes:
    preset: str | None  # None: glm4_jax.fixtures.TINY
    copy_bytes: int
    matmul: int
    new_tokens: int
    decode: tuple[tuple[int, int], ...]  # (batch, prompt)
    prefill: int
    long_context: int
    parity_prompt: int
    greedy_prompt: int
    greedy_new: int
    repeats: int
    qmatmul: tuple[tuple[int, int], ...] = ((4096, 13696), (13696, 4096))  # [K, O]: gate / up, and down


FULL = Shapes("glm-4-9b-chat", 4 << 30, 8192, 128, ((1, 128), (64, 1024)), 8192, 131072, 512, 128, 64, 3)
TINY = Shapes(None, 16 << 20, 256, 16, ((1, 32), (4, 64)), 256, 1024, 64, 16, 16, 1, ((256, 512), (512, 256)))


def model_config(shapes: Shapes, quant: str | None = None):
    from glm4_jax.config import preset
    from glm4_jax.fixtures import TINY as TINY_CFG

    if shapes.preset is None:  # int4 groups must divide head_dim (32)
        return TINY_CFG.replace(dtype="bfloat16", quant=quant, group_size=32)
    return preset(shapes.preset).replace(dtype="bfloat16", quant=quant)


class Recorder:
    """A part's result file, rewritten after every figure, so whatever was measured survives the part."""

    def __init__(self, path: pathlib.Path):
        self.path, self.data = path, {"rows": [], "info": {}}

    def row(self, **row):
        self.data["rows"].append(row)
        self.write()

    def info(self, **info):
        self.data["info"].update(info)
        self.write()

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which must block until its result is ready) after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- the parts (each runs in a process of its own) --------------------------------------------------------------


def part_floor(shapes: Shapes, rec: Recorder, work: pathlib.Path) -> None:
    import jax
    import jax.numpy as jnp

    rec.info(device=jax.devices()[0].device_kind, jax=jax.__version__)
    src = [jnp.ones(shapes.copy_bytes // 2, jnp.bfloat16)]
    nbytes = 2 * src[0].nbytes
    copy = jax.jit(lambda x: -x)  # reads and writes every byte once
    s = timed(lambda: copy(src[0]).block_until_ready(), 10)
    rec.row(what="copy", gb_s=nbytes / s / 1e9, bytes=nbytes, seconds=s)
    src.clear()  # the matmul's operands need no room beside it
    n = shapes.matmul
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    s = timed(lambda: mm(a, b).block_until_ready(), 10)
    rec.row(what=f"bf16 matmul {n}^3", tflop_s=2 * n**3 / s / 1e12, seconds=s)


def floor_bandwidth(work: pathlib.Path) -> float | None:
    """The copy rate the floor part measured (bytes/s), else the known rate of the device, else None."""
    try:
        rows = json.loads((work / "floor.json").read_text())["rows"]
        return next(r["gb_s"] for r in rows if r["what"] == "copy") * 1e9
    except (OSError, ValueError, KeyError, StopIteration):
        from glm4_jax.bench import device_bandwidth

        return device_bandwidth(None)


def _jax_decode(shapes: Shapes, rec: Recorder, work: pathlib.Path, quant, workloads) -> None:
    import jax

    from glm4_jax.bench import peak_memory, run_workload
    from glm4_jax.engine import Generator
    from glm4_jax.placement import random_model

    cfg = model_config(shapes, quant)
    bw = floor_bandwidth(work)
    rec.info(device=jax.devices()[0].device_kind, jax=jax.__version__, quant=quant or "bf16", floor_b_s=bw)
    t = time.perf_counter()
    model = random_model(cfg)
    rec.info(weights_s=round(time.perf_counter() - t, 2), weights_peak_bytes=peak_memory())
    gen = Generator(model, prefill_chunk=2048)
    for kind, batch, prompt, new, repeats in workloads:
        r = run_workload(gen, kind, batch, prompt, new, repeats, bw)
        rec.row(**dataclasses.asdict(r), quant=quant or "bf16", peak_bytes=peak_memory())


def part_jax_bf16(shapes, rec, work):
    workloads = [("decode", b, p, shapes.new_tokens, shapes.repeats) for b, p in shapes.decode]
    workloads.append(("prefill", 1, shapes.prefill, 1, shapes.repeats))
    _jax_decode(shapes, rec, work, None, workloads)


def part_jax_int8(shapes, rec, work):
    _jax_decode(shapes, rec, work, "int8", [("decode", *shapes.decode[0], shapes.new_tokens, shapes.repeats)])


def part_jax_int4(shapes, rec, work):
    _jax_decode(shapes, rec, work, "int4", [("decode", *shapes.decode[0], shapes.new_tokens, shapes.repeats)])


def _ready(fn, *args):
    return fn(*args).block_until_ready()


def part_qmatmul(shapes, rec, work):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from glm4_jax import qkernel, qmatmul, quant

    gpu = jax.default_backend() == "gpu"
    rec.info(device=jax.devices()[0].device_kind, jax=jax.__version__, kernel="pallas" if gpu else "pallas-interpret")
    rng = np.random.default_rng(0)
    repeats = 20 if shapes.preset else 2
    for K, O in shapes.qmatmul:
        w = (0.05 * rng.standard_normal((K, O))).astype(np.float32)
        x = jnp.asarray(rng.standard_normal((1, K)), jnp.bfloat16)
        for scheme in ("int8", "int4"):
            v, sc = (jnp.asarray(a) for a in quant.quantize(w, (0,), scheme, 128, scale_dtype=jnp.bfloat16))
            nbytes = v.nbytes + sc.nbytes
            kw = dict(quant=scheme, group=128)
            xla = jax.jit(functools.partial(qmatmul.linear, n_in=1, **kw))
            kern = jax.jit(functools.partial(qkernel.linear, interpret=not gpu, **kw))
            qkernel.ENABLED = False  # xla is traced (on its first call) with the XLA path
            try:
                ref = xla(x, v, sc)
            finally:
                qkernel.ENABLED = True
            s = timed(functools.partial(_ready, xla, x, v, sc), repeats)
            row = dict(what=f"x [1, {K}] @ W [{K}, {O}] {scheme}", weight_bytes=nbytes)
            row |= dict(xla_ms=s * 1e3, xla_gb_s=nbytes / s / 1e9)
            try:
                out = kern(x, v, sc)
                s = timed(functools.partial(_ready, kern, x, v, sc), repeats)
            except Exception as e:  # a kernel that does not lower here: recorded with the XLA figures
                rec.row(**row, kernel_error=str(e).strip().splitlines()[0][:200])
                continue
            diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            row |= dict(kernel_ms=s * 1e3, kernel_gb_s=nbytes / s / 1e9, speedup=row["xla_ms"] / (s * 1e3))
            rec.row(**row, max_diff=diff, linear_takes_kernel=qkernel.applies(1, K, O, scheme, 128))


def part_jax_long(shapes, rec, work):
    prompt = shapes.long_context - shapes.new_tokens
    _jax_decode(shapes, rec, work, None, [("decode", 1, prompt, shapes.new_tokens, 1)])


def hf_state_dict(params: dict, cfg) -> dict:
    """Our parameter tree (`param_tree(model)`, jax arrays) as a transformers GlmForCausalLM state dict of torch
    tensors on the same device (through DLPack), one tensor at a time."""
    import torch

    from glm4_jax.model import split

    def t(x):
        return torch.from_dlpack(x)

    layers = params["layers"]
    D = cfg.hidden_size
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["final_norm"])}
    sd["lm_head.weight"] = t(params["lm_head"]).T.contiguous()
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = t(layers["attn_norm"][i])
        sd[h + "post_attention_layernorm.weight"] = t(layers["mlp_norm"][i])
        # our q/k/v and gate/up are fused (glm4_jax.model.split gives the parts, one layer at a time)
        qkv = split("layers/qkv", layers["qkv"][i], cfg.num_kv_heads)
        bias = split("layers/qkv_bias", layers["qkv_bias"][i], cfg.num_kv_heads) if cfg.attention_bias else None
        for j, x in enumerate("qkv"):
            sd[h + f"self_attn.{x}_proj.weight"] = t(qkv[j]).reshape(D, -1).T.contiguous()
            if bias is not None:
                sd[h + f"self_attn.{x}_proj.bias"] = t(bias[j]).reshape(-1).contiguous()
        sd[h + "self_attn.o_proj.weight"] = t(layers["o"][i]).reshape(-1, D).T.contiguous()
        gate, up = (t(x) for x in split("layers/gate_up", layers["gate_up"][i], cfg.num_kv_heads))
        sd[h + "mlp.gate_up_proj.weight"] = torch.cat([gate.T, up.T], dim=0).contiguous()
        sd[h + "mlp.down_proj.weight"] = t(layers["down"][i]).T.contiguous()
    return sd


def hf_model_from(model, device: str):
    """transformers GlmForCausalLM (bf16, eval) holding the weights of our `model`."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from glm4_jax.fixtures import hf_glm_kwargs
    from glm4_jax.placement import param_tree

    cfg = model.cfg
    with torch.device("meta"):
        hf = GlmForCausalLM(GlmConfig(**hf_glm_kwargs(cfg), tie_word_embeddings=False)).to(torch.bfloat16)
    sd = {k: v.to(device) for k, v in hf_state_dict(param_tree(model), cfg).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if [k for k in missing if not k.endswith("inv_freq")] or unexpected:
        raise RuntimeError(f"weights do not match GlmForCausalLM: missing {missing}, unexpected {unexpected}")
    with torch.device(device):  # the rotary buffers were made on meta: make them again
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.to(device).eval()


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def part_hf(shapes, rec, work):
    import jax
    import torch
    import transformers

    sys.path.insert(0, str(HERE))
    from vs_transformers import run_hf

    from glm4_jax.placement import random_model

    device = _torch_device()
    model = random_model(model_config(shapes))
    hf = hf_model_from(model, device)
    del model
    jax.clear_caches()
    args = argparse.Namespace(
        tiny=shapes.preset is None,
        device=device,
        decode=",".join(f"{b}x{p}" for b, p in shapes.decode),
        prefill=str(shapes.prefill),
        new_tokens=shapes.new_tokens,
        repeats=shapes.repeats,
        compile=device == "cuda",
    )
    rec.info(torch=torch.__version__, transformers=transformers.__version__, device=device, compiled=args.compile)
    for row in run_hf(args, hf):
        rec.row(**row)
    if device == "cuda":
        rec.info(peak_bytes=torch.cuda.max_memory_allocated())


def part_parity(shapes, rec, work):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from glm4_jax.engine import Generator
    from glm4_jax.options import SamplingParams
    from glm4_jax.placement import random_model

    device = _torch_device()
    model = random_model(model_config(shapes), seed=1)
    hf = hf_model_from(model, device)
    vocab = min(model.cfg.vocab_size, 151329)
    prompt = np.random.RandomState(0).randint(0, vocab, (1, shapes.parity_prompt))

    graphdef, state = nnx.split(model)  # the weights as an argument, not as constants of the program
    forward = jax.jit(lambda state, t, p: nnx.merge(graphdef, state)(t, p)[0])
    ours = forward(state, jnp.asarray(prompt), jnp.arange(prompt.shape[1])[None])
    ours = np.asarray(ours[0], np.float64)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(prompt, device=device)).logits[0].float().cpu().numpy().astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(theirs), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)  # KL(transformers || ours) per position
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    rec.row(what=f"logits over {prompt.shape[1]} tokens", top1=top1, max_kl=float(kl.max()), mean_kl=float(kl.mean()))

    g = prompt[:, : shapes.greedy_prompt]
    n = shapes.greedy_new
    res = Generator(model).generate(g.tolist(), max_new_tokens=n, sampling=SamplingParams(temperature=0.0), stop_ids=())
    mine = list(res.ids[0])[:n]
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(g, device=device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=model.cfg.pad_token_id,
        )
    ref = out[0, g.shape[1] :].tolist()
    first = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), min(len(mine), len(ref)))
    same = sum(a == b for a, b in zip(mine, ref, strict=False))
    rec.row(what=f"greedy {n} new tokens", same_ids=same, of=n, first_difference=first)


PARTS = {name: globals()[f"part_{name}"] for name in BUDGETS}


# ---- the driver -------------------------------------------------------------------------------------------------


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def ratios(parts: dict) -> list[dict]:
    """glm4-jax / transformers for each workload both measured."""
    ours = {r["workload"]: r for r in parts.get("jax_bf16", {}).get("rows", [])}
    out = []
    for r in parts.get("hf", {}).get("rows", []):
        o = ours.get(r["workload"])
        metric = "decode_tok_s" if "decode_tok_s" in r else "prefill_tok_s"
        if o and o.get(metric) and r.get(metric):
            out.append({"workload": r["workload"], "metric": metric, "glm4_jax": o[metric], "transformers": r[metric]})
            out[-1]["ratio"] = o[metric] / r[metric]
    return out


def write_results(out: pathlib.Path, results: dict) -> None:
    results["ratios"] = ratios(results["parts"])
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    lines = [f"# device suite ({results['mode']})", ""]
    for name, part in results["parts"].items():
        lines.append(f"## {name}: {part['status']} ({part['seconds']:.0f} s of {part['budget_s']} s)")
        if part.get("error"):
            lines.append(f"\n    {part['error']}")
        rows = part.get("rows", [])
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        if part.get("info"):
            lines += ["", ", ".join(f"{k}: {fmt(v)}" for k, v in part["info"].items())]
        lines.append("")
    if results["ratios"]:
        lines += ["## glm4-jax / transformers", "", "| workload | metric | glm4-jax | transformers | ratio |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {r['workload']} | {r['metric']} | {fmt(r['glm4_jax'])} | {fmt(r['transformers'])} | {r['ratio']:.2f}x |"
            for r in results["ratios"]
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def run_part(name: str, budget: float, args, work: pathlib.Path, log) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--part", name, "--work", str(work)]
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if name in ("hf", "parity"):  # JAX shares the device with torch: take memory as needed, not 75% up front
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    (work / f"{name}.json").unlink(missing_ok=True)
    log.write(f"\n==== {name} (budget {budget:.0f} s) ====\n")
    log.flush()
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=budget)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = "timed out"
    seconds = time.perf_counter() - t
    try:
        data = json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError):
        data = {"rows": [], "info": {}}
    part = {"status": status, "seconds": seconds, "budget_s": round(budget), **data}
    if status != "ok":
        log.flush()
        tail = [ln for ln in pathlib.Path(log.name).read_text().splitlines() if ln.strip()][-1:]
        part["error"] = tail[0][-300:] if tail else status
    return part


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="output directory (results.json, results.md, suite.log)")
    p.add_argument("--tiny", action="store_true", help="every part on tiny shapes (CPU)")
    p.add_argument("--parts", default=",".join(BUDGETS), help=f"comma-separated, of {', '.join(BUDGETS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every part's time budget")
    p.add_argument("--part", help=argparse.SUPPRESS)  # run one part in this process (the driver's children)
    p.add_argument("--work", help="folder of the parts' own files (default OUT/parts)")
    args = p.parse_args(argv)
    shapes = TINY if args.tiny else FULL

    if args.part:
        work = pathlib.Path(args.work)
        PARTS[args.part](shapes, Recorder(work / f"{args.part}.json"), work)
        return 0

    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    bad = [n for n in names if n not in PARTS]
    if not args.out or bad or args.budget_scale <= 0:
        why = "--out is required" if not args.out else f"unknown parts {bad}" if bad else "--budget-scale must be > 0"
        print(f"error: {why} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    work = pathlib.Path(args.work) if args.work else out / "parts"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "mode": "tiny" if args.tiny else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    results["parts"] = {}
    with open(out / "suite.log", "w") as log:
        for name in names:
            budget = (TINY_BUDGET if args.tiny else BUDGETS[name]) * args.budget_scale
            part = run_part(name, budget, args, work, log)
            results["parts"][name] = part
            write_results(out, results)
            print(f"{name}: {part['status']} in {part['seconds']:.0f} s", flush=True)
    print((out / "results.md").read_text())
    return 0 if all(p["status"] == "ok" for p in results["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
