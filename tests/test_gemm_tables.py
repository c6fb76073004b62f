"""Tuned GEMM tables: CSV round trip, lookup order, table-driven config selection, atomic concurrent merges,
``kiln tune gemm`` argument handling (the tuning itself needs an H100/H200: marked gpu)."""
from __future__ import annotations

import csv
import multiprocessing as mp
import os

import pytest

from kiln import knobs
from kiln.cli import main as cli_main
from kiln.schedules import tables
from kiln.schedules.configs import (SM90_GEMM_CONFIGS, GemmConfig, lookup_sm90_config, select_sm90_config,
                                    sm90_candidates)
from kiln.tune.gemm import PRESETS, GemmProblem, parse_problems


def _row(M=128, N=1024, K=1024, epi="bias", cfg="64x128x64_s4_c1_g8_k2", t=5.0):
    return tables.TableRow("sm90a", M, N, K, "float16", "TN", epi, cfg, t, 2 * M * N * K / t / 1e6, 1e-3, 6.0,
                           12, "0.27.0.post1", "2026-11-21")


def test_config_name_round_trip():
    for cfg in sm90_candidates(128, 1024, 4096) + sm90_candidates(4096, 4096, 1024):
        assert GemmConfig.from_name(cfg.name()) == cfg
    with pytest.raises(ValueError, match="not a GemmConfig name"):
        GemmConfig.from_name("128x256")


def test_candidates_include_split_k_only_where_it_can_help():
    small = {c.name() for c in sm90_candidates(128, 1024, 4096)}
    assert "64x64x64_s6_c1_g8_k8" in small and "64x64x64_s6_c1_g8" in small
    big = sm90_candidates(8192, 8192, 8192)
    assert all(c.split_k == 1 for c in big)          # 2048+ tiles: splitting K only adds traffic
    assert all(c.check(128, 1024, 4096) is None for c in sm90_candidates(128, 1024, 4096))


def test_lookup_prefers_exact_epilogue_then_same_shape(tmp_path):
    t = tables.GemmTable(str(tmp_path / "t.csv"))
    t.merge([_row(epi="bias", cfg="64x128x64_s4_c1_g8_k2", t=5.0),
             _row(epi="bias+residual", cfg="64x64x64_s6_c1_g8_k4", t=4.0)])
    again = tables.GemmTable(str(tmp_path / "t.csv"))
    assert again.lookup("sm90a", 128, 1024, 1024, "float16", "TN", "bias").config == "64x128x64_s4_c1_g8_k2"
    # no row for bias+gelu: the fastest row of the same shape
    assert again.lookup("sm90a", 128, 1024, 1024, "float16", "TN", "bias+gelu").config == "64x64x64_s6_c1_g8_k4"
    assert again.lookup("sm90a", 256, 1024, 1024, "float16", "TN", "bias") is None
    with open(tmp_path / "t.csv") as f:
        assert [r["config"] for r in csv.DictReader(f)] == ["64x128x64_s4_c1_g8_k2", "64x64x64_s6_c1_g8_k4"]


def test_selection_uses_the_table_and_records_misses(tmp_path):
    tables.GemmTable(str(tmp_path / "sm90a_gemm.csv")).merge([_row(cfg="64x128x64_s4_c1_g8_k2")])
    with knobs.scope(tables_dir=str(tmp_path)):
        cfg, src = lookup_sm90_config(128, 1024, 1024, "float16", "bias")
        assert (cfg.name(), src) == ("64x128x64_s4_c1_g8_k2", "table")
        cfg, src = lookup_sm90_config(130, 1024, 1024, "float16", "bias")
        assert src == "heuristic" and cfg == select_sm90_config(130, 1024, 1024)
        assert ("sm90a", 130, 1024, 1024, "float16", "TN", "bias") in tables.untuned()
        # a table written for 132 SMs is not used for another SM count
        assert lookup_sm90_config(128, 1024, 1024, "float16", "bias", num_sms=114)[1] == "heuristic"


def test_invalid_table_config_falls_back_to_heuristic(tmp_path):
    # a row whose config cannot run the problem (split 3 does not divide 16 k-tiles) is not used
    tables.GemmTable(str(tmp_path / "sm90a_gemm.csv")).merge([_row(cfg="64x64x64_s6_c1_g8_k3")])
    with knobs.scope(tables_dir=str(tmp_path)):
        assert lookup_sm90_config(128, 1024, 1024, "float16", "bias")[1] == "heuristic"


def _merge_many(path, start):
    t = tables.GemmTable(path)
    for i in range(start, start + 20):
        t.merge([_row(M=8 * (i + 1), cfg=SM90_GEMM_CONFIGS[i % 4].name())])


def test_concurrent_merges_keep_every_row(tmp_path):
    path = str(tmp_path / "t.csv")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(path, 20 * k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(tables.GemmTable(path).rows) == 60
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_shipped_table_rows_are_valid():
    t = tables.GemmTable(tables.table_path("sm90a"))
    for row in t.rows.values():
        cfg = GemmConfig.from_name(row.config)
        assert cfg.check(row.M, row.N, row.K, row.dtype) is None, row
        assert row.max_rel_err <= 2e-2 and row.time_us > 0, row


def test_parse_problems_and_cli_errors(capsys):
    ps = parse_problems("bert-large,129x1000x2048:bias+gelu", "bfloat16")
    assert len(ps) == len(PRESETS["bert-large"]) + 1
    assert ps[-1] == GemmProblem(129, 1000, 2048, "bfloat16", ("bias", "gelu"))
    assert cli_main(["tune", "gemm", "--problems", "12x3"]) == 2
    assert "bad problem '12x3'" in capsys.readouterr().err
