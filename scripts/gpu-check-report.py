#!/usr/bin/env python3
"""The bookkeeping of scripts/gpu-check.sh (standard library only: the GPU machine has no
network and the CI machine no extra packages).

  record RESULTS NAME STATUS LIMIT SECONDS RC REASON LOG [FIGURES]
      appends one step to RESULTS (gpu-check.json, replaced atomically, so a run stopped at any
      point leaves a valid file) with the figures of its kind read from FIGURES and LOG, then
      rewrites the summary next to it.
  start RESULTS JSON      writes RESULTS with the run's description (JSON object) and no steps.
  finish RESULTS          marks the run finished and rewrites the summary.
  cli-figures DIR OUT     gathers the CLI step's files in DIR into one JSON object in OUT.
"""

import json
import os
import re
import sys

def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def test_figures(log):
    """Each test's verdict and the lines the device checks print (max |Δ| and the like), from
    libtest's output with --nocapture and one thread: `test NAME ... ` opens a test, its printed
    lines follow, and `ok` or `FAILED` closes it (on the same line when it printed nothing)."""
    tests, lines, current = {}, [], None
    for line in log.splitlines():
        m = re.match(r"test (\S+) \.\.\. ?(.*)$", line)
        if m:
            current, line = m.group(1), m.group(2)
        verdict = re.fullmatch(r"(.*?)\s*\b(ok|FAILED|ignored)", line.strip())
        if current and verdict:
            line = verdict.group(1)
            tests[current] = verdict.group(2)
            current = None if not line else current
        if "|Δ" in line or "relative logit error" in line or "fused kernel" in line:
            lines.append(line.strip())
    summary = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", log)
    passed = sum(int(p) for p, _ in summary)
    failed = sum(int(f) for _, f in summary)
    return {"passed": passed, "failed": failed, "tests": tests, "checks": lines}


def figures_of(name, log_path, figures_path):
    log = ""
    if log_path and os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
    figures = None
    if figures_path and os.path.exists(figures_path):
        try:
            figures = load(figures_path)
        except ValueError as e:
            figures = {"unreadable": f"{figures_path}: {e}"}
    if name == "tests":
        figures = test_figures(log)
    tail = log.splitlines()[-15:]
    return figures, tail


def first_error(tail_lines, log_path):
    """The first line that says what went wrong: `Error: ...` (anyhow), `error...`, or a panic
    with its message; else the last non-empty line."""
    lines = []
    if log_path and os.path.exists(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [l.rstrip() for l in f]
    for i, line in enumerate(lines):
        if "panicked at" in line:
            return " ".join(l.strip() for l in lines[i:i + 2])
        if line.startswith("Error: ") or re.match(r"error(\[|:)", line):
            return line.strip()
    return next((l.strip() for l in reversed(tail_lines) if l.strip()), "")


def record(results, name, status, limit, seconds, rc, reason, log_path, figures_path=None):
    run = load(results)
    figures, tail = figures_of(name, log_path, figures_path)
    if status == "failed":
        reason = f"{reason}: {first_error(tail, log_path)[:300]}"
    step = {
        "name": name,
        "status": status,
        "seconds": round(float(seconds), 1),
        "limit_s": int(limit),
        "exit_code": int(rc),
        "reason": reason or None,
        "log": os.path.relpath(log_path, os.path.dirname(results)) if log_path else None,
        "figures": figures,
    }
    if status != "ok":
        step["log_tail"] = tail
    run["steps"].append(step)
    save(results, run)
    write_summary(results, run)


def ms(value):
    return "-" if value is None else f"{value:.3f}"


def decode_lines(steps):
    rows = [r for s in steps if s["name"].startswith("decode-") for r in
            ((s.get("figures") or {}).get("rows") or [])]
    if not rows:
        return []
    batches = sorted({b for r in rows for b, _ in r["decode_ms_per_layer"]})

    def at(row, batch):
        return next((v for b, v in row["decode_ms_per_layer"] if b == batch), None)

    anchor = next((r for r in rows if r["runtime"] == "candle-transformers"), None)
    ours = next((r for r in rows if r["runtime"] == "rfid-moe" and r["checkpoint"] == "original"),
                None)
    out = ["decode, ms per token per layer (speed-up vs candle-transformers / vs our original):"]
    for r in rows:
        cells = []
        for b in batches:
            v = at(r, b)
            ratios = [f"{at(ref, b) / v:.2f}x" if ref and v and at(ref, b) else "-"
                      for ref in (anchor, ours)]
            cells.append(f"b={b} {ms(v)} ({' / '.join(ratios)})")
        mib = r["expert_bytes_per_layer"] / 2**20
        out.append(f"  {r['runtime']:<19} {r['checkpoint']:<14} {mib:8.1f} MiB  "
                   f"prefill {ms(r['prefill_ms_per_layer'])}  " + "  ".join(cells))
    return out


def step_line(s, figures):
    if s["name"] == "tests" and figures:
        return f"{figures['passed']} passed, {figures['failed']} failed"
    if s["name"] == "compress-bench" and figures and "mean" in figures:
        m, e = figures["mean"], figures.get("extrapolation", {})
        return (f"{m['total']:.1f} s per MoE layer (calibrate {m['calibrate']:.1f}, factor "
                f"{m['factor']:.1f}); whole model ~{e.get('whole_model_seconds', 0):.0f} s")
    if s["name"] == "cli" and figures:
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in figures.items() if k != "generate_line" and v is not None]
        return ", ".join(parts)
    return ""


def write_summary(results, run):
    out = [f"gpu-check {run.get('mode')}{' (quick)' if run.get('quick') else ''}: "
           f"{run.get('device', '')}",
           f"pack {run.get('pack', {}).get('commit', '?')}"
           f"{'+uncommitted changes' if run.get('pack', {}).get('dirty') else ''}, "
           f"started {run.get('started')}"
           f"{', finished' if run.get('finished') else ', NOT finished'}", ""]
    for s in run["steps"]:
        figures = s.get("figures")
        text = f"{s['name']:<24} {s['status']:<8} {s['seconds']:6.1f} s / {s['limit_s']} s"
        detail = s.get("reason") or step_line(s, figures)
        out.append(text + (f"  {detail}" if detail else ""))
    tests = next((s for s in run["steps"] if s["name"] == "tests"), None)
    if tests and tests.get("figures"):
        out += ["", "device checks:"] + [f"  {c}" for c in tests["figures"]["checks"]]
    decode = decode_lines(run["steps"])
    if decode:
        out += [""] + decode
    with open(os.path.join(os.path.dirname(results), "summary.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def cli_figures(directory, out):
    figures = {}
    for key, name in (("ppl_original", "eval-original.json"),
                      ("ppl_compressed", "eval-compressed.json")):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            report = load(path)
            figures[key] = report["perplexity"][0]["perplexity"]
            for d in report.get("divergence", []):
                figures["kl_vs_original"] = d.get("mean_kl")
                figures["top1_agreement"] = d.get("top1_agreement")
    report = os.path.join(directory, "compress.json")
    if os.path.exists(report):
        figures["compress_seconds"] = load(report).get("seconds")
    log = os.path.join(directory, "generate.log")
    if os.path.exists(log):
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = [l.strip() for l in f if "tokens/s" in l]
        if lines:
            figures["generate_line"] = lines[-1]
            m = re.search(r"([0-9.]+) tokens/s after the first", lines[-1])
            if m:
                figures["decode_tokens_per_s"] = float(m.group(1))
    save(out, figures)


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "record":
        record(*args)
    elif command == "start":
        run = json.loads(args[1])
        run.update(steps=[], finished=False)
        save(args[0], run)
        write_summary(args[0], run)
    elif command == "finish":
        run = load(args[0])
        run["finished"] = True
        save(args[0], run)
        write_summary(args[0], run)
    elif command == "cli-figures":
        cli_figures(*args)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
