"""Markdown tables of bench/gpu.py's results (what goes into docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any


def _f(value: float | None, digits: int = 2, kind: str = "f", percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}{kind}}"


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"### {m['device_name']} ({m['device']})",
        "",
        f"{m['date']}; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}; `{m['command']}`",
        f"{m['config']} architecture, random weights, {m['size']}x{m['size']}, {m['steps']} DDIM steps, "
        f"CFG {m['guidance']}; peak for MFU: {m['peak_tflops'] or 'n/a'} TFLOP/s dense fp16",
        "",
    ]
    if "precision" in results:
        p = results["precision"]
        lines += [f"Precision (batch {p['batch']}, {p['steps']} steps, final latents vs float32):", ""]
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
        lines.append("")
    if results.get("vae"):
        v = results["vae"]
        lines += [
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
    ours = {r["batch"]: r for r in results.get("ours", [])}
    theirs = {r["batch"]: r for r in results.get("diffusers", [])}
    if ours or theirs:
        lines += [
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
        lines.append("")
    # "engine" holds one row per load (a single row in older result files)
    engine = results.get("engine") or []
    streams = [("engine", row) for row in (engine if isinstance(engine, list) else [engine])]
    streams += [("worker", results["worker"])] if results.get("worker") else []
    if streams:
        lines += [
            "| continuous batching | requests at once | img/s | p50 s | p99 s | rows/call | MFU "
            "| 1st step done s | step gap ms | after last step s |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|"]
        label = {"engine": "engine in-process (no Redis)", "worker": "real worker + Redis"}
        for key, row in streams:
            phases = row.get("phases") or {}
            lines.append(
                f"| {row.get('label', label[key])} | {row['requests']} | {row['images_per_s']:.3f} "
                f"| {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['rows_per_call']:.1f} "
                f"| {_f(row.get('mfu'), percent=True)} | {_f(phases.get('first_step_end_s'), 2)} "
                f"| {_f(phases.get('median_step_gap_ms'), 1)} | {_f(phases.get('after_last_step_s'), 2)} |"
            )
        lines.append("")
        diagnosed = [(key, row) for key, row in streams if row.get("control")]
        if diagnosed:
            lines += [
                "Engine against the same batch through the Pipeline directly (same runner, just before); "
                "UNet calls timed on the device:",
                "",
                "| load | path | img/s | UNet calls | ms per call | ms between call starts | longest gap ms "
                "| UNet share of the span | 2-step load: fresh thread, again (s) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for _, row in diagnosed:
                for path, img_s, calls in (
                    ("engine", row["images_per_s"], row.get("unet_calls") or {}),
                    ("direct", row["control"]["images_per_s"], row["control"].get("unet_calls") or {}),
                ):
                    lines.append(
                        f"| {row.get('label', 'engine')}, {row['requests']} | {path} | {img_s:.3f} "
                        f"| {calls.get('calls', 0)} | {_f(calls.get('median_call_ms'), 1)} "
                        f"| {_f(calls.get('median_cadence_ms'), 1)} | {_f(calls.get('max_gap_ms'), 1)} "
                        f"| {_f(calls.get('unet_share'), percent=True)} "
                        f"| {', '.join(f'{x:.2f}' for x in row.get('warm_up_loads_s', [])) if path == 'engine' else ''} |"
                    )
            lines.append("")
    if results.get("profile"):
        p = results["profile"]
        lines += [
            f"Profile: one UNet call of {p['rows']} rows, {p['ms_per_call']:.1f} ms of {p['time']} time "
            f"(eager, mean of {p['calls']}); top ops by self time:",
            "",
            "| op | ms per call | share | calls per UNet call |",
            "|---|---|---|---|",
        ]
        for row in p["top"][:15]:
            name = row["name"].replace("|", "/")[:100]
            lines.append(
                f"| `{name}` | {row['ms_per_call']:.2f} | {100 * row['share']:.1f}% "
                f"| {row['count_per_call']:.0f} |"
            )
        lines.append("")
    if results.get("ablations"):
        base = results["ablations"][0]["images_per_s"]
        batch = results["ablations"][0]["batch"]
        # diffusers at the same batch in the same run, when it ran: each variant's speed-up over it
        reference = theirs.get(batch)
        lines += [
            f"| ablation (batch {batch}) | img/s | ms/step | vs fast path | vs diffusers "
            "| latents vs the first row (2 steps) |"
        ]
        lines += ["|---|---|---|---|---|---|"]
        for row in results["ablations"]:
            speedup = f"{row['images_per_s'] / reference['images_per_s']:.2f}x" if reference else "n/a"
            lines.append(
                f"| {row['name']} | {row['images_per_s']:.3f} | {row['ms_per_step']:.1f} "
                f"| {row['images_per_s'] / base:.2f}x | {speedup} "
                f"| {_f(row.get('vs_default_relative_error'), 1, 'e')} |"
            )
        lines.append("")
    bad = {k: v["status"] for k, v in results["stages"].items() if v["status"] != "ok"}
    if bad:
        lines += ["Stages not run or failed:", ""] + [f"- {k}: {v}" for k, v in bad.items()] + [""]
    if "elapsed_s" in results:
        lines.append(f"Whole run: {results['elapsed_s']:.0f} s.")
    return "\n".join(lines)
