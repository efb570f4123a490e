"""The plan dict (``report.make_plan``) as a text table."""

from __future__ import annotations


def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def flops_lines(f: dict) -> list[str]:
    lines = [
        "## FLOPs (FlopCounterMode on meta: 2 x multiply-adds; backward run, not assumed)",
        "grad: params = trained engine, backward to its weights; input = frozen net that",
        "gradients flow through to its input (no weight gradients); none = no_grad",
        f"{'call':44} {'net':8} {'grad':6} {'x':>3} {'forward':>10} {'backward':>10} {'b/f':>5}",
    ]
    for c in f["step_calls"]:
        lines.append(
            f"{c['label'][:44]:44} {c['net']:8} {c['grad']:6} {c['times']:>3} "
            f"{_si(c['fwd'], 'F'):>10} {_si(c['bwd'], 'F'):>10} {c['bwd'] / max(c['fwd'], 1):>5.2f}"
        )
    lines += [
        f"training step per rank: {_si(f['step_per_rank'], 'FLOP')}  "
        f"(per sample {_si(f['step_per_sample'], 'FLOP')})",
        f"teacher cache per sample: {_si(f['cache_per_sample'], 'FLOP')}  "
        f"({', '.join(c['label'] for c in f['cache_calls']) or '-'})",
        f"inference per image: teacher {_si(f['infer_teacher_per_image'], 'FLOP')}, "
        f"student {_si(f['infer_student_per_image'], 'FLOP')}",
    ]
    return lines


def memory_lines(m: dict) -> list[str]:
    lines = [
        f"## memory per rank, GiB (teacher {m['teacher_partition']})",
        f"{'ZeRO':5}" + "".join(f"{k:>12}" for k in m["stages"][0]),
    ]
    for stage, parts in m["stages"].items():
        lines.append(f"{stage:<5}" + "".join(f"{_gib(v):>12}" for v in parts.values()))
    lines += [
        "networks: "
        + "; ".join(
            f"{n} {_si(c['params'])} params ({_si(c['trainable'])} trainable)"
            for n, c in m["nets"].items()
        ),
        f"activations: {m['activations_estimate']}",
    ]
    return lines


def bytes_lines(b: dict, samples: int) -> list[str]:
    lines = [
        "## bytes",
        f"input shard per sample: {_si(b['shard_per_sample']['bytes'], 'B')} (PNG bound: "
        f"incompressible content), total {_si(b['shards_total'], 'B')} for "
        f"{samples} samples",
    ]
    if b["cache_per_sample"]:
        lines.append(
            f"teacher cache per sample: {_si(b['cache_per_sample']['bytes'], 'B')} "
            f"({', '.join(b['cache_per_sample']['members'])}), total "
            f"{_si(b['cache_total'], 'B')}"
        )
    return [*lines, f"read per rank: {_si(b['read_per_rank_per_s'], 'B/s')}"]


def format_plan(p: dict) -> str:
    r = p["projection"]
    lines = [
        f"# plan: {p['config']} {' '.join(p['overrides'])}  ({p['recipe']}, "
        f"{p['gpus']} x {p['gpu']}, MFU {p['mfu']:g}, {p['precision']})",
        f"micro-batch {p['batch_per_rank']} per rank, gt crop {p['gt_size']}",
        "",
        *flops_lines(p["flops"]),
        "",
        *memory_lines(p["memory"]),
        "",
        *bytes_lines(p["bytes"], p["samples"]),
        "",
        f"## projection ({_si(r['peak_tflops'] * 1e12, 'FLOP/s')} peak x MFU {p['mfu']:g})",
        f"training: {r['steps_per_s']:.3g} steps/s, {r['max_steps']} steps = "
        f"{r['train_wall_hours']:.3g} h wall, {r['train_gpu_hours']:.4g} GPU-hours",
        f"teacher cache: {r['cache_gpu_hours']:.4g} GPU-hours for {p['samples']} samples "
        f"({r['cache_precision']})",
        "",
    ]
    lines += [f"note: {n}" for n in p["notes"]]
    absent = dict.fromkeys(k for k, _ in p["missing_files"])
    lines += [f"absent file (planned without it): {k}" for k in absent]
    return "\n".join(lines)
