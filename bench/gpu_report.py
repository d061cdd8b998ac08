"""Markdown tables of bench/gpu.py's results (what goes into docs/benchmarks.md): one function per
section, each returning its lines (none when its stage did not run)."""

from __future__ import annotations

from typing import Any


def _f(value: float | None, digits: int = 2, kind: str = "f", percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}{kind}}"


def markdown(results: dict[str, Any]) -> str:
    lines = header(results)
    for section in (
        precision,
        vae,
        batches,
        continuous_batching,
        engine_against_direct,
        decode_tail,
        kernels,
        buckets,
        profile,
        ablations,
        sdxl,
    ):
        lines += section(results)
    bad = {
        k: v["status"]
        for k, v in results["stages"].items()
        if v["status"] != "ok" and v["status"] != "skipped (--only)"
    }
    if bad:
        lines += ["Stages not run or failed:", ""] + [f"- {k}: {v}" for k, v in bad.items()] + [""]
    if "elapsed_s" in results:
        lines.append(f"Whole run: {results['elapsed_s']:.0f} s.")
    return "\n".join(lines)


def header(results: dict[str, Any]) -> list[str]:
    m = results["meta"]
    return [
        f"### {m['device_name']} ({m['device']})",
        "",
        f"{m['date']}; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}; `{m['command']}`",
        f"{m['config']} architecture, random weights, {m['size']}x{m['size']}, {m['steps']} DDIM steps, "
        f"CFG {m['guidance']}; peak for MFU: {m['peak_tflops'] or 'n/a'} TFLOP/s dense fp16",
        "",
    ]


def precision(results: dict[str, Any]) -> list[str]:
    if "precision" not in results:
        return []
    p = results["precision"]
    lines = [f"Precision (batch {p['batch']}, {p['steps']} steps, final latents vs float32):", ""]
    lines += ["| variant | relative error | <= 1e-2 |", "|---|---|---|"]
    for name, row in p["rows"].items():
        verdict = {True: "yes", False: "NO", None: "(no bar)"}[row["pass"]]
        lines.append(f"| {name} | {row['relative_error']:.2e} | {verdict} |")
    for key, ours_name in (
        ("diffusers_vs_ours_fp32", "float32"),
        ("diffusers_vs_ours_fp16", "float16 eager"),
    ):
        if key in results:
            d = results[key]
            name = f"diffusers ({d['diffusers_dtype']}) vs ours ({ours_name})"
            lines.append(f"| {name} | {d['relative_error']:.2e} | |")
    return [*lines, ""]


def vae(results: dict[str, Any]) -> list[str]:
    if not results.get("vae"):
        return []
    v = results["vae"]
    lines = [
        "VAE decode alone (the engine's chunks, fast path's layout and flags); pixels of the "
        "precision stage's float32 latents against the float32 decode:",
        "",
        "| VAE | layout | latents | per call | first s | s | ms per image | max level diff "
        "| mean level diff | pixels off by > 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in v["rows"]:
        if "error" in row:
            lines.append(f"| {row['vae_dtype']} | {row['layout']} | failed: {row['error']} |")
            continue
        lines.append(
            f"| {row['vae_dtype']} | {row.get('layout', 'n/a')} | {row['latents']} | {row['per_call']} "
            f"| {_f(row.get('first_s'), 1)} | {row['s']:.3f} "
            f"| {row['ms_per_image']:.1f} | {row['max_level_diff']} | {row['mean_level_diff']:.3f} "
            f"| {100 * row['share_off_by_more_than_1']:.3f}% |"
        )
    lines.append("")
    f = v.get("fallback")
    if f:
        lines += [
            f"Latents x10000: {f['float16_decodes_overflowed']} of {f['latents']} float16 decodes "
            "overflowed; with the float32 fallback, max level diff against the float32 decode: "
            f"{f['fallback_max_level_diff_vs_float32']}.",
            "",
        ]
    return lines


def batches(results: dict[str, Any]) -> list[str]:
    ours = {r["batch"]: r for r in results.get("ours", [])}
    theirs = {r["batch"]: r for r in results.get("diffusers", [])}
    if not (ours or theirs):
        return []
    lines = [
        "| batch | ours img/s | diffusers img/s | speed-up | ours ms/step | diffusers ms/step "
        "| ours MFU | diffusers MFU | ours UNet-step MFU | ours GPU GB | diffusers GPU GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in sorted(set(ours) | set(theirs)):
        a, b = ours.get(batch), theirs.get(batch)
        speedup = f"{a['images_per_s'] / b['images_per_s']:.2f}x" if a and b else "n/a"
        lines.append(
            f"| {batch} | {_f(a and a['images_per_s'], 3)} | {_f(b and b['images_per_s'], 3)} "
            f"| {speedup} | {_f(a and a['ms_per_step'], 1)} | {_f(b and b['ms_per_step'], 1)} "
            f"| {_f(a and a['mfu'], percent=True)} | {_f(b and b['mfu'], percent=True)} "
            f"| {_f(a and a['step_mfu'], percent=True)} | {_f(a and a.get('peak_gb'), 2)} "
            f"| {_f(b and b.get('peak_gb'), 2)} |"
        )
    return [*lines, ""]


def _engine_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    # one row per load (a single row in result files of the first runs)
    engine = results.get("engine") or []
    return engine if isinstance(engine, list) else [engine]


def continuous_batching(results: dict[str, Any]) -> list[str]:
    streams = [("engine", row) for row in _engine_rows(results)]
    streams += [("worker", results["worker"])] if results.get("worker") else []
    if not streams:
        return []
    lines = [
        "| continuous batching | requests at once | img/s | p50 s | p99 s | rows/call | MFU "
        "| 1st step done s | step gap ms | after last step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    label = {"engine": "engine in-process (no Redis)", "worker": "real worker + Redis"}
    for key, row in streams:
        phases = row.get("phases") or {}
        lines.append(
            f"| {row.get('label', label[key])} | {row['requests']} | {row['images_per_s']:.3f} "
            f"| {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['rows_per_call']:.1f} "
            f"| {_f(row.get('mfu'), percent=True)} | {_f(phases.get('first_step_end_s'), 2)} "
            f"| {_f(phases.get('median_step_gap_ms'), 1)} | {_f(phases.get('after_last_step_s'), 2)} |"
        )
    return [*lines, ""]


def engine_against_direct(results: dict[str, Any]) -> list[str]:
    diagnosed = [row for row in _engine_rows(results) if row.get("control")]
    if not diagnosed:
        return []
    lines = [
        "Engine against the same batch through the Pipeline directly (same runner, just before); "
        "UNet calls timed on the device:",
        "",
        "| load | path | img/s | UNet calls | ms per call | ms between call starts | longest gap ms "
        "| UNet share of the span | 2-step load: fresh thread, again (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in diagnosed:
        for path, img_s, calls in (
            ("engine", row["images_per_s"], row.get("unet_calls") or {}),
            ("direct", row["control"]["images_per_s"], row["control"].get("unet_calls") or {}),
        ):
            loads = ", ".join(f"{x:.2f}" for x in row.get("warm_up_loads_s", [])) if path == "engine" else ""
            lines.append(
                f"| {row.get('label', 'engine')}, {row['requests']} | {path} | {img_s:.3f} "
                f"| {calls.get('calls', 0)} | {_f(calls.get('median_call_ms'), 1)} "
                f"| {_f(calls.get('median_cadence_ms'), 1)} | {_f(calls.get('max_gap_ms'), 1)} "
                f"| {_f(calls.get('unet_share'), percent=True)} | {loads} |"
            )
    return [*lines, ""]


def decode_tail(results: dict[str, Any]) -> list[str]:
    tails = [row for row in _engine_rows(results) if row.get("tail")]
    if not tails:
        return []
    lines = [
        "PNG/decode tail of each engine load: from the end of its last UNet call (on the device) to "
        "its last PNG stored; PNG encoding summed over the writer threads, which overlap:",
        "",
        "| load | tail s | decode calls | decode s | last decode to last PNG s | PNG encoding s |",
        "|---|---|---|---|---|---|",
    ]
    for row in tails:
        t = row["tail"]
        lines.append(
            f"| {row.get('label', 'engine')}, {row['requests']} | {t['after_last_unet_s']:.3f} "
            f"| {t['decode_calls']} | {t['decode_s']:.3f} | {_f(t.get('last_decode_to_last_png_s'), 3)} "
            f"| {t['png_encode_s']:.3f} |"
        )
    return [*lines, ""]


def kernels(results: dict[str, Any]) -> list[str]:
    if not results.get("kernels"):
        return []
    k = results["kernels"]
    graph = (
        "replayed in its CUDA graph" if k["time"] == "device" else "through the runner (no graph on the CPU)"
    )
    lines = [
        f"Kernels of one compiled UNet call of {k['rows']} rows, outside a CUDA graph ({k['time']} time, "
        f"mean of {k['calls']}): {k['ms_per_call']:.1f} ms; the same call {graph}: "
        f"{_f(k.get('graph_call_ms'), 1)} ms.",
        "",
        "| kind | ms per call | share | kernels | launches per call | largest |",
        "|---|---|---|---|---|---|",
    ]
    for row in k["kinds"]:
        largest = (row["largest"] or "").replace("|", "/")[:90]
        lines.append(
            f"| {row['kind']} | {row['ms_per_call']:.2f} | {100 * row['share']:.1f}% | {row['kernels']} "
            f"| {row['launches_per_call']:.0f} | {f'`{largest}`' if largest else ''} |"
        )
    return [*lines, ""]


def buckets(results: dict[str, Any]) -> list[str]:
    if not results.get("buckets"):
        return []
    b = results["buckets"]
    default, fine = ",".join(map(str, b["default"])), ",".join(map(str, b["fine"]))
    lines = [
        f"One UNet call of the fast path, padded to its CUDA-graph bucket (median of {b['calls']}): "
        f"default buckets {default} against {fine}:",
        "",
        "| rows | default bucket | ms | finer bucket | ms | finer vs default |",
        "|---|---|---|---|---|---|",
    ]
    for row in b["rows"]:
        lines.append(
            f"| {row['rows']} | {row['default_bucket']} | {row['default_ms']:.1f} | {row['fine_bucket']} "
            f"| {row['fine_ms']:.1f} | {row['fine_speedup']:.2f}x |"
        )
    return [*lines, ""]


def profile(results: dict[str, Any]) -> list[str]:
    if not results.get("profile"):
        return []
    p = results["profile"]
    lines = [
        f"Profile: one UNet call of {p['rows']} rows, {p['ms_per_call']:.1f} ms of {p['time']} time "
        f"(eager, mean of {p['calls']}); top kernels (ops on the CPU) by self time:",
        "",
        "| op | ms per call | share | calls per UNet call |",
        "|---|---|---|---|",
    ]
    for row in p["top"][:15]:
        name = row["name"].replace("|", "/")[:100]
        lines.append(
            f"| `{name}` | {row['ms_per_call']:.2f} | {100 * row['share']:.1f}% | {row['count_per_call']:.0f} |"
        )
    return [*lines, ""]


def ablations(results: dict[str, Any]) -> list[str]:
    if not results.get("ablations"):
        return []
    base = results["ablations"][0]["images_per_s"]
    batch = results["ablations"][0]["batch"]
    # diffusers at the same batch in the same run, when it ran: each variant's speed-up over it
    reference = next((r for r in results.get("diffusers", []) if r["batch"] == batch), None)
    lines = [
        f"| ablation (batch {batch}) | img/s | ms/step | vs fast path | vs diffusers "
        "| latents vs the first row (2 steps) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["ablations"]:
        speedup = f"{row['images_per_s'] / reference['images_per_s']:.2f}x" if reference else "n/a"
        lines.append(
            f"| {row['name']} | {row['images_per_s']:.3f} | {row['ms_per_step']:.1f} "
            f"| {row['images_per_s'] / base:.2f}x | {speedup} "
            f"| {_f(row.get('vs_default_relative_error'), 1, 'e')} |"
        )
    return [*lines, ""]


def sdxl(results: dict[str, Any]) -> list[str]:
    x = results.get("sdxl")
    if not x or not (x["ours"] or x["diffusers"]):
        return []
    ours = {r["batch"]: r for r in x["ours"]}
    theirs = {r["batch"]: r for r in x["diffusers"]}
    lines = [
        f"SDXL ({x['config']} architecture, {x['unet_parameters'] / 1e6:,.0f} M UNet parameters, random weights), "
        f"{x['size']}x{x['size']}, {x['steps']} {x['sampler']} steps, CFG, {x['dtype']}; ours: {x['accel']} "
        "fast path; diffusers' StableDiffusionXLPipeline, same weights, prompts and seeds:",
        "",
        "| batch | ours img/s | diffusers img/s | speed-up | ours ms/step | diffusers ms/step | ours GPU GB "
        "| diffusers GPU GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch in sorted(set(ours) | set(theirs)):
        a, b = ours.get(batch), theirs.get(batch)
        speedup = f"{a['images_per_s'] / b['images_per_s']:.2f}x" if a and b else "n/a"
        lines.append(
            f"| {batch} | {_f(a and a['images_per_s'], 3)} | {_f(b and b['images_per_s'], 3)} | {speedup} "
            f"| {_f(a and a['ms_per_step'], 1)} | {_f(b and b['ms_per_step'], 1)} "
            f"| {_f(a and a.get('peak_gb'), 2)} | {_f(b and b.get('peak_gb'), 2)} |"
        )
    if x.get("latents_relative_error") is not None:
        lines += [
            "",
            f"Final latents of ours and diffusers at batch 1: {x['latents_relative_error']:.2e} apart.",
        ]
    return [*lines, ""]
