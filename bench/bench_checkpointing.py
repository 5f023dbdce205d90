"""What --gradient_checkpointing saves and costs on a generator of over 1B parameters: peak memory and step time.

A decoder-only generator built from a config with random weights (default: a Llama of TinyLlama-1.1B's shape,
1.10B parameters: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocabulary 32,000), trained as
`--generator_type causal` trains it: one step is a forward pass with the plain LM loss over --batch rows of --seq
random token ids (labels = inputs, in train mode, no KV cache) and its backward pass. Without and with gradient
checkpointing, each in a fresh process, so that its peak RSS is its own; --rounds rounds, in alternating order
(plain, checkpointed, then checkpointed, plain), so that a shared machine's drift falls on both sides.
Checkpointing is switched on by the function --gradient_checkpointing calls (model.assembly.checkpoint_activations).

Each process builds the model in --dtype, gives every parameter a zero gradient (allocated up front, as backward
would), then reads its memory: the baseline, weights + gradients (+ the imports). The peak of the steps is read
after resetting the peak counter there: on CPU VmHWM of /proc/self/status (reset through /proc/self/clear_refs),
with CUDA `torch.cuda.max_memory_allocated` over `memory_allocated` (the model on the GPU). Activation memory is
the peak over the baseline: what the forward pass keeps for the backward pass, the logits and the loss's
float32 copy, and the backward's transient buffers. No optimizer: its state is the same with and without
checkpointing (AdamW: 8 bytes a parameter), added by arithmetic in bench/README.md. Step time: the median of
the --steps timed steps after one untimed warm-up step, over every round.

Memory safety: the run is refused, before any model is built, when the predicted peak (weights, gradients and an
upper estimate of the activations) exceeds --max_gib or 80% of MemAvailable, and each measuring process asks to
be the OOM killer's first choice (oom_score_adj 1000), so that a misjudged run cannot take another process down.

    python bench/bench_checkpointing.py --json OUT.json        # bf16, seq 512, 2 x 2 steps: ~6.5 GiB peak
    python bench/bench_checkpointing.py --seq 256 --steps 1 --rounds 1 --json bench/results/checkpointing.json
    python bench/bench_checkpointing.py --layers 2 --hidden 256 --intermediate 688 --heads 4 --kv_heads 4 \
        --vocab 2000 --seq 64 --steps 2 --rounds 1                                # a quick check: seconds

Figures are printed, never asserted. CPU figures need Linux (/proc).
"""

from __future__ import annotations

from bench_env import REPO, write_json

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from rag_end2end.model.assembly import checkpoint_activations, is_checkpointing

GIB = 2**30
MIB = 2**20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CONFIGS = ("plain", "checkpointed")


# ---------------------------------------------------------------------- memory readings


def status(field: str) -> int:
    """A /proc/self/status field (VmHWM: peak RSS, VmRSS: current), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux >= 4.0), so that the next reading is the steps' own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def available_memory() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


# ---------------------------------------------------------------------- the model


def llama_config(args: argparse.Namespace) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
    )


def parameter_count(args: argparse.Namespace) -> int:
    """The config's parameters, by arithmetic (the same figure the built model counts)."""
    h, i, kv = args.hidden, args.intermediate, args.hidden // args.heads * args.kv_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    return args.layers * layer + 2 * args.vocab * args.hidden + args.hidden


def predicted_peak(args: argparse.Namespace) -> int:
    """An upper estimate of a plain step's peak: weights and gradients, 40 hidden-sized and 8 MLP-sized tensors a
    token and layer (a Llama layer keeps ~12 and ~4 in bf16), and the logits' four vocabulary-sized float32 copies
    a token (logits, the loss's copy, their gradients), over the imports' ~1 GiB."""
    size = DTYPES[args.dtype].itemsize
    tokens = args.batch * args.seq
    activations = tokens * args.layers * (40 * args.hidden + 8 * args.intermediate) * size
    return 2 * parameter_count(args) * size + activations + 4 * tokens * args.vocab * 4 + GIB


# ---------------------------------------------------------------------- one measuring process


def measure(config: str, args: argparse.Namespace) -> dict:
    """Build the model, allocate its gradients, then time --steps + 1 steps and read the peak over the baseline.

    It resets this process's peak RSS (clear_refs): run it in a process of its own, as run_child does."""
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_config(llama_config(args), dtype=DTYPES[args.dtype]).to(device)
    built_s = time.perf_counter() - start
    model.train()
    if config == "checkpointed":
        checkpoint_activations(model, "the generator")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = status("VmRSS")
        reset_peak()
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() if cuda else status("VmHWM")
    return {
        "config": config,
        "checkpointing": is_checkpointing(model),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": built_s,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "activation_bytes": peak - baseline,
        "step_s": times[1:],
        "warmup_s": times[0],
        "first_loss": losses[0],
        "threads": torch.get_num_threads(),
    }


def run_child(config: str, args: argparse.Namespace, argv: list[str]) -> dict:
    """`measure(config)` in a fresh Python process; its result is the last line it prints."""
    cmd = [sys.executable, __file__, *argv, "--child", config]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{config}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the run and its report


def summarise(runs: list[dict], args: argparse.Namespace) -> dict:
    """Per configuration: the largest peak and activation memory over its rounds, the median step; the ratios."""
    out = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        out[config] = {
            "baseline_bytes": max(r["baseline_bytes"] for r in mine),
            "peak_bytes": max(r["peak_bytes"] for r in mine),
            "activation_bytes": max(r["activation_bytes"] for r in mine),
            "step_s": statistics.median(t for r in mine for t in r["step_s"]),
            "steps": sum(len(r["step_s"]) for r in mine),
        }
    plain, ckpt = out["plain"], out["checkpointed"]
    tokens = args.batch * args.seq
    out["ratios"] = {
        "activation": ckpt["activation_bytes"] / plain["activation_bytes"],
        "peak": ckpt["peak_bytes"] / plain["peak_bytes"],
        "step_time": ckpt["step_s"] / plain["step_s"],
    }
    out["per_token_layer"] = {  # the activation figures README's arithmetic extrapolates from
        config: out[config]["activation_bytes"] / tokens / args.layers for config in CONFIGS
    }
    return out


def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "mem_available_gib_at_start": available_memory() / GIB,
        "load_average": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown(result: dict) -> str:
    p, s = result["params"], result["summary"]
    lines = [
        f"Llama-shaped generator, {result['parameters'] / 1e9:.2f}B parameters ({p['layers']} layers, hidden "
        f"{p['hidden']}, MLP {p['intermediate']}, vocabulary {p['vocab']}), random weights in {p['dtype']}; "
        f"batch {p['batch']} x {p['seq']} tokens, LM loss, forward + backward, no optimizer; "
        f"{result['runs'][0]['device']}.",
        "",
        "| | weights + grads (baseline) | peak | activations (peak - baseline) | per token and layer | step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        c = s[config]
        lines.append(
            f"| {config} | {c['baseline_bytes'] / MIB:,.0f} MiB | {c['peak_bytes'] / MIB:,.0f} MiB | "
            f"{c['activation_bytes'] / MIB:,.0f} MiB | {s['per_token_layer'][config] / 1024:,.1f} KiB | "
            f"{c['step_s']:.1f} s (median of {c['steps']}) |"
        )
    r = s["ratios"]
    lines += [
        "",
        f"checkpointed / plain: activation memory {r['activation']:.2f}x (target <= 0.5), peak {r['peak']:.2f}x, "
        f"step time {r['step_time']:.2f}x (target <= 1.4)",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="of the weights, gradients, activations")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="tokens a row")
    p.add_argument("--steps", type=int, default=2, help="timed steps a process, after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="processes per configuration, in alternating order")
    p.add_argument("--max_gib", type=float, default=11.0, help="refuse a run whose predicted peak is larger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--child", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        oom_score_adj = Path("/proc/self/oom_score_adj")
        oom_score_adj.write_text("1000")  # the OOM killer's first choice, never another run
        print(json.dumps({**measure(args.child, args), "oom_score_adj": int(oom_score_adj.read_text())}))
        return
    predicted, available = predicted_peak(args), available_memory()
    if predicted > min(args.max_gib * GIB, 0.8 * available):
        sys.exit(
            f"refused: a plain step is predicted to peak at {predicted / GIB:.1f} GiB, over --max_gib {args.max_gib} "
            f"or 80% of MemAvailable ({available / GIB:.1f} GiB): use a shorter --seq or --dtype bf16"
        )
    argv = [a for a in sys.argv[1:] if a != "--json" and a != args.json]
    env = environment()
    print(f"{parameter_count(args) / 1e9:.2f}B parameters; predicted plain peak {predicted / GIB:.1f} GiB", flush=True)
    runs = []
    for i in range(args.rounds):
        for config in CONFIGS if i % 2 == 0 else CONFIGS[::-1]:
            runs.append(run_child(config, args, argv))
            r = runs[-1]
            print(
                f"round {i + 1} {config}: baseline {r['baseline_bytes'] / MIB:,.0f} MiB, peak "
                f"{r['peak_bytes'] / MIB:,.0f} MiB, steps {', '.join(f'{t:.1f}' for t in r['step_s'])} s "
                f"(warm-up {r['warmup_s']:.1f} s, build {r['build_s']:.0f} s), loss {r['first_loss']:.3f}",
                flush=True,
            )
    params = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
    result = {
        "bench": "checkpointing",
        "environment": env,
        "params": params,
        "parameters": runs[0]["parameters"],
        "runs": runs,
        "summary": summarise(runs, args),
    }
    print("\n" + markdown(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
