"""The benchmark harness runs end to end in quick mode and writes its table, JSON and chart."""

import json

from benchmarks import harness, large, report


def test_quick_harness_writes_table_json_and_chart(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# by hand\n\n{report.BEGIN}\nstale\n{report.END}\n\n## kept\n")
    rows = "GGN @ v|KFAC build type-2|inverse"
    harness.main(
        ["--quick", "--in-process", "--models", "tiny", "--select", rows]
        + ["--output-dir", str(tmp_path), "--results-md", str(results)]
    )
    record = json.loads((tmp_path / "harness.json").read_text())
    assert set(record["models"]["tiny"]) == {"torch", "jax"}
    torch_rows = record["models"]["tiny"]["torch"]["measurements"]
    expected = {"plain|gradient", "ours|GGN @ v", "curvlinops|GGN @ v", "plain|GGN @ v"}
    expected |= {
        f"{impl}|{row}"
        for impl in ("ours", "curvlinops")
        for row in ("KFAC build type-2", report.KFAC_INVERSE_ROW)
    }
    assert expected <= set(torch_rows)
    assert all(entry["ratio_median"] > 0 for entry in torch_rows.values())
    assert torch_rows["ours|GGN @ v"]["vs_curvlinops"] > 0
    assert torch_rows["ours|GGN @ v"]["memory_ratio"] > 0
    # one GGN product multiplies at least as much as the forward pass of the gradient
    assert torch_rows["ours|GGN @ v"]["flop_ratio"] > 1 / 3
    jax_rows = record["models"]["tiny"]["jax"]["measurements"]
    assert {"plain|gradient", "ours|GGN @ v", "plain|GGN @ v"} <= set(jax_rows)
    text = results.read_text()
    assert text.startswith("# by hand") and text.endswith("## kept\n")
    assert "stale" not in text
    assert "| GGN @ v |" in text and "harness.png" in text
    assert (tmp_path / "harness.png").stat().st_size > 0


def test_quick_large_writes_table_json_and_chart(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# by hand\n\n{large.BEGIN}\nstale\n{large.END}\n\n## kept\n")
    large.main(
        ["--quick", "--models", "gpt", "--output-dir", str(tmp_path), "--results-md", str(results)]
    )
    record = json.loads((tmp_path / "large.json").read_text())
    entries = {(e["impl"], e["row"]): e for e in record["models"]["gpt"]["entries"]}
    for row in ("Hessian @ v", "GGN @ v", "EmpiricalFisher @ v", "FisherMC @ v"):
        assert entries[("ours", row)]["ratio"] > 0 and entries[("curvlinops", row)]["ratio"] > 0
    assert entries[("ours", "KFAC inverse @ v (cached)")]["ratio"] > 0
    krylov = [e for e in entries.values() if e["row"].startswith(("top-", "GGN trace", "logdet"))]
    assert len(krylov) == 3 and all(e["columns"] > 0 and e["ratio"] > 0 for e in krylov)
    # curvlinops' EKFAC takes 2-d outputs only: the GPT's row is n/a, with its error
    ekfac = entries[("curvlinops", "EKFAC build mc, Linear/Conv2d parameters")]
    assert ekfac["missing"] and ekfac["ratio"] is None
    assert record["models"]["gpt"]["streaming"]["memory_ratio"] > 0
    text = results.read_text()
    assert text.startswith("# by hand") and text.endswith("## kept\n")
    assert "stale" not in text and "| GGN @ v |" in text and "What a GPU would change" in text
    assert (tmp_path / "large.png").stat().st_size > 0


def test_report_ratios_and_target_verdicts():
    def entry(row, impl, seconds, columns=1, flops=None):
        return {
            "row": row,
            "impl": impl,
            "columns": columns,
            "median_s": seconds,
            "min_s": seconds,
            "flops": flops,
        }

    torch_rows = [
        entry("gradient", "plain", 2.0, flops=10),
        entry("GGN @ v", "ours", 2.0, flops=15),
        entry("GGN @ v", "curvlinops", 5.0),
        entry(f"GGN {report.MATRIX_ROW}", "ours", 32.0, columns=8, flops=96),
        entry("Hessian @ v", "ours", 5.0, flops=20),
    ]
    jax_rows = [
        entry("gradient", "plain", 1.0),
        entry("GGN @ v", "ours", 1.5),
        entry("GGN @ v", "plain", 1.2),
    ]
    record = {
        "models": {
            "cnn": {
                framework: {"measurements": {f"{e['impl']}|{e['row']}": e for e in rows}}
                for framework, rows in (("torch", torch_rows), ("jax", jax_rows))
            }
        }
    }
    report.add_ratios(record)
    table = report.model_table(record["models"]["cnn"])
    # GGN @ v: 1.0 gradients (≤ 1.5 met), 0.4× curvlinops (≤ 0.6 met), JAX 1.5 ÷ 1.2 = 1.25
    # of the plain JAX product (≤ 1.15 missed)
    assert "| GGN @ v | 1.00 | 2.50 | 0.40 |" in table
    assert "met (1.00); met (0.40); missed (1.25) |" in table
    # 8 columns: 32 s / 8 / 2 s = 2.0 per column, over the 1.0 bound, as are its FLOPs
    # (96 / 8 / 10 = 1.2): the verdict names that arithmetic floor; no curvlinops row
    assert "missed (2.00; FLOPs 1.20); not measured; not measured |" in table
    # Hessian @ v: 2.5 gradients over the 2.2 bound with FLOPs 2.0 under it: a plain miss
    assert "| Hessian @ v | 2.50 |" in table and "missed (2.50); not measured" in table
    # against a baseline, our cells read before → after; the peer's stay single
    before = json.loads(json.dumps(record))
    before["models"]["cnn"]["torch"]["measurements"]["ours|GGN @ v"]["median_s"] = 3.0
    report.add_ratios(before)
    compared = report.model_table(record["models"]["cnn"], before["models"]["cnn"])
    assert "| GGN @ v | 1.50 → 1.00 | 2.50 | 0.60 → 0.40 |" in compared
