"""The capacity model behind `d4s plan` (pipeline/capacity/, its costs file pipeline/capacity/costs.yaml)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.capacity import (
    COSTS_PATH,
    FULL_BUILD_COUNTS,
    CostsError,
    capacity_report,
    format_capacity,
    full_build_markdown,
    projection_from_counts,
)
from pipeline.config import BuildConfig, ConfigError
from pipeline.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data of all nine layouts, rendered once for the module, and its build config."""
    from pipeline.demo.build_demo import demo_config

    out = tmp_path_factory.mktemp("capacity_demo")
    return out, demo_config(str(out))


@pytest.fixture(scope="module")
def demo_report(demo):
    return capacity_report(demo[1])


def planner_counts(cfg: BuildConfig) -> dict[str, tuple[int, int]]:
    plan = make_plan(cfg)
    out: dict[str, list[int]] = {}
    for s in plan.scenes:
        out.setdefault(s["dataset"], [0, 0])[0] += 1
    for c in plan.clips:
        out[c["dataset"]][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def with_datasets(cfg: BuildConfig, **overrides) -> BuildConfig:
    """A copy of ``cfg`` keeping only the named datasets, each with its field overrides."""
    raw = cfg.model_dump(mode="json")
    raw["datasets"] = {name: {**raw["datasets"][name], **over} for name, over in overrides.items()}
    return BuildConfig.model_validate(raw)


def costs_raw() -> dict:
    return yaml.safe_load(COSTS_PATH.read_text())


# ------------------------------------------------------------------------------------------
# d4s plan: counts equal the planner's


def test_plan_demo_text_counts_match_planner(demo, monkeypatch):
    from pipeline.cli import app

    out, cfg = demo
    monkeypatch.setattr("pipeline.cli._plan_demo_folder", lambda: contextlib.nullcontext(str(out)))  # reuse the data
    res = runner.invoke(app, ["plan", "--demo"])
    assert res.exit_code == 0, res.output
    expected = planner_counts(cfg)
    seen = {}
    for line in res.output.splitlines():
        parts = line.split()
        if parts and parts[0] in expected and parts[0] not in seen:  # first table: dataset scenes clips ...
            seen[parts[0]] = (int(parts[1].replace(",", "")), int(parts[2].replace(",", "")))
        if parts and parts[0] == "total" and "total" not in seen:
            seen["total"] = (int(parts[1].replace(",", "")), int(parts[2].replace(",", "")))
    assert len(expected) == 9
    assert {k: v for k, v in seen.items() if k != "total"} == expected
    assert seen["total"] == (sum(v[0] for v in expected.values()), sum(v[1] for v in expected.values()))
    assert "assumptions:" in res.output


def test_plan_demo_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """`plan --demo` renders its data to a temporary folder, which it left behind (3.8 MB a run)."""
    import tempfile

    import pipeline.demo.build_demo as build_demo
    from pipeline.cli import app

    real = build_demo.demo_config
    monkeypatch.setattr(build_demo, "demo_config", lambda out: real(out, ["tartanair"], scenes=1))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = runner.invoke(app, ["plan", "--demo", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["datasets"][0]["dataset"] == "tartanair"
    assert list(tmp_path.iterdir()) == []


def test_plan_demo_json_parses_and_is_consistent(demo, monkeypatch):
    from pipeline.cli import app

    out, cfg = demo
    monkeypatch.setattr("pipeline.cli._plan_demo_folder", lambda: contextlib.nullcontext(str(out)))
    res = runner.invoke(app, ["plan", "--demo", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    expected = planner_counts(cfg)
    rows = {r["dataset"]: r for r in rep["datasets"]}
    assert {k: (r["scenes"], r["clips"]) for k, r in rows.items()} == expected
    rcfg = cfg.resolved()
    for name, r in rows.items():
        assert r["frames"] == r["clips"] * rcfg.datasets[name].clip_length
        assert r["output_bytes"] > 0
        assert r["image_hw_source"].startswith("read from")  # the demo data is readable: sizes are probed
    t = rep["totals"]
    for k in ("scenes", "clips", "frames", "output_bytes"):
        assert t[k] == sum(r[k] for r in rows.values())
    for k in ("depth", "tracks", "megasam"):
        assert t["gpu_hours"][k] == pytest.approx(sum(r["gpu_hours"][k] for r in rows.values()))
    assert rep["assumptions"] and all(isinstance(a, str) for a in rep["assumptions"])


def test_report_is_json_serialisable_and_formats(demo_report):
    assert json.loads(json.dumps(demo_report)) == demo_report
    text = format_capacity(demo_report)
    for r in demo_report["datasets"]:
        assert r["dataset"] in text
    assert "[" not in text  # printed through rich: no markup-like brackets


def test_image_size_is_read_from_the_data_or_nominal_when_not(demo, demo_report):
    rows = {r["dataset"]: r for r in demo_report["datasets"]}
    assert all(r["image_hw_source"].startswith("read from") for r in rows.values())
    assert tuple(rows["vkitti2"]["image_hw"]) != (375, 1242)  # the demo's miniature frames, not the release size
    nominal = capacity_report(with_datasets(demo[1], vkitti2={}), probe=False)
    r = nominal["datasets"][0]
    assert tuple(r["image_hw"]) == tuple(costs_raw()["datasets"]["vkitti2"]["hw"])
    assert r["image_hw_source"].startswith("nominal")
    assert any(a.startswith("vkitti2: image size") for a in nominal["assumptions"])
    assert r["output_bytes"] > rows["vkitti2"]["output_bytes"]  # release-size frames are far larger


def test_unreadable_first_clip_falls_back_to_nominal_with_the_reason(demo, monkeypatch):
    import stages.ingest.stage as ingest_stage
    from pipeline.clip import ClipFailure

    monkeypatch.setattr(
        ingest_stage,
        "ingest_clip",
        lambda spec, scene, cfg: ClipFailure(spec["clip_id"], "ingest", "truncated image", "x/000.png"),
    )
    rep = capacity_report(with_datasets(demo[1], spring={}))
    r = rep["datasets"][0]
    assert r["image_hw_source"].startswith("nominal") and "truncated image" in r["image_hw_source"]
    assert tuple(r["image_hw"]) == tuple(costs_raw()["datasets"]["spring"]["hw"])
    assert any("spring: image size" in a and "truncated image" in a for a in rep["assumptions"])


# ------------------------------------------------------------------------------------------
# Model rules


def test_gpu_hours_double_when_clips_double(demo):
    _, cfg = demo
    names = {"realestate10k": {}, "kubric_movi_f": {}, "stereo4d": {}}
    full = capacity_report(with_datasets(cfg, **names))
    half = capacity_report(with_datasets(cfg, **{k: {"max_scenes": 1} for k in names}))
    for f, h in zip(full["datasets"], half["datasets"]):
        assert f["clips"] == 2 * h["clips"] > 0, "premise: the two demo scenes of each dataset plan equally many clips"
        for k in ("depth", "tracks", "megasam"):
            assert f["gpu_hours"][k] == pytest.approx(2 * h["gpu_hours"][k], rel=1e-12)
    assert full["totals"]["gpu_hours"]["depth"] > 0 and full["totals"]["gpu_hours"]["tracks"] > 0
    # the same through the counts projection
    counts = [{"dataset": "realestate10k", "scenes": 1000, "frames_per_scene": 300}]
    p1 = projection_from_counts(counts)
    p2 = projection_from_counts([{**counts[0], "scenes": 2000}])
    for k in ("depth", "tracks", "megasam", "total"):
        assert p2["totals"]["gpu_hours"][k] == pytest.approx(2 * p1["totals"]["gpu_hours"][k], rel=1e-12)
        assert p1["totals"]["gpu_hours"][k] > 0


def test_gt_depth_has_no_depth_gpu_hours(demo, demo_report):
    _, cfg = demo
    rcfg = cfg.resolved()
    for r in demo_report["datasets"]:
        src = rcfg.datasets[r["dataset"]].depth_source
        assert (r["gpu_hours"]["depth"] == 0) == (src == "gt"), r["dataset"]
        assert r["gpu_hours"]["megasam"] == 0  # no demo dataset uses MegaSaM
        assert (r["gpu_hours"]["tracks"] > 0) == (rcfg.datasets[r["dataset"]].track_source == "cotracker"), r["dataset"]
    # the same dataset with a non-gt depth source does run the depth model
    rep = capacity_report(with_datasets(cfg, tartanair={"depth_source": "vda"}))
    assert rep["datasets"][0]["gpu_hours"]["depth"] > 0
    assert "depth" in rep["datasets"][0]["model_stages"]


def test_megasam_hours_follow_the_per_frame_figure_of_the_costs(demo):
    _, cfg = demo
    c = costs_raw()
    c["megasam"]["gpu_s_per_frame"] = 3.6  # 1 hour per 1000 frames
    rep = capacity_report(with_datasets(cfg, realestate10k={"depth_source": "megasam"}), costs=c)
    r = rep["datasets"][0]
    # scene passes: MegaSaM runs over each scene's frames once (2 scenes of 10 frames), not the
    # clips' overlapping 32 frames
    assert r["model_frames"] == 20 < r["frames"] == 32 and r["model_passes"] == 2
    assert r["gpu_hours"]["megasam"] == pytest.approx(r["model_frames"] / 1000.0)
    assert r["megasam_cache_bytes"] >= 20 * 2 * r["image_hw"][0] * r["image_hw"][1]  # demo frames are tiny: full size
    assert rep["totals"]["megasam_cache_bytes"] == r["megasam_cache_bytes"]
    assert "of MegaSaM cache" in format_capacity(rep)
    assert not any("megasam.gpu_s_per_frame" in a and "assumption" in a for a in rep["assumptions"])
    default = capacity_report(with_datasets(cfg, realestate10k={"depth_source": "megasam"}))
    assert any("megasam.gpu_s_per_frame" in a and "not a measurement" in a for a in default["assumptions"])


def test_depth_cost_follows_the_network_size_and_tracks_ignore_image_size():
    from stages.depth.vda.infer import network_size

    c = costs_raw()
    pts = c["depth"]["resolution_points"]
    k = math.log(pts[0]["frames_per_s"] / pts[1]["frames_per_s"]) / math.log(
        (pts[1]["hw"][0] * pts[1]["hw"][1]) / (pts[0]["hw"][0] * pts[0]["hw"][1])
    )

    def hours(hw):
        rep = projection_from_counts([{"dataset": "realestate10k", "scenes": 100, "frames_per_scene": 200, "hw": hw}])
        return rep["datasets"][0]

    a, b, wide = hours([360, 640]), hours([720, 1280]), hours([512, 1024])
    # VDA resizes the short side to input_size: 360x640 and 720x1280 give the same network input
    assert network_size(360, 640) == network_size(720, 1280)
    assert a["gpu_hours"]["depth"] == pytest.approx(b["gpu_hours"]["depth"])
    na, nw = network_size(360, 640), network_size(512, 1024)
    assert wide["gpu_hours"]["depth"] / a["gpu_hours"]["depth"] == pytest.approx(
        ((nw[0] * nw[1]) / (na[0] * na[1])) ** k
    )
    # CoTracker resizes every clip to its fixed input: the image size does not change its cost
    assert (
        a["gpu_hours"]["tracks"]
        == pytest.approx(b["gpu_hours"]["tracks"])
        == pytest.approx(wide["gpu_hours"]["tracks"])
    )
    # bytes and CPU grow with the stored pixels
    assert b["output_bytes"] > a["output_bytes"] and b["cpu_core_hours"]["ingest"] > a["cpu_core_hours"]["ingest"]


def test_track_cost_is_proportional_to_point_frames():
    def tracks(**stage):
        cfg = BuildConfig.model_validate(
            {"output": "x", "datasets": {"kubric_movi_f": {"root": "x"}}, "stages": {"tracks": stage}}
        )
        rep = projection_from_counts([{"dataset": "kubric_movi_f", "scenes": 10, "frames_per_scene": 24}], cfg=cfg)
        return rep["datasets"][0]["gpu_hours"]["tracks"]

    # one query frame at frame 0: no backward pass; grid 8 -> 16 is 4x the points
    assert tracks(grid_size=16, query_frames=1) == pytest.approx(4 * tracks(grid_size=8, query_frames=1))
    # three query frames: 3x the points and a backward pass
    assert tracks(grid_size=8, query_frames=3) == pytest.approx(6 * tracks(grid_size=8, query_frames=1))


def test_bytes_model_is_close_to_the_encoder_on_demo_clips(demo, demo_report):
    """Projected bytes vs real shard bytes of ground-truth demo datasets (ingest + encode + tar, no Ray)."""
    from pipeline.sample_format import encode_clip
    from stages.ingest.stage import ingest_clip
    from stages.tracks.stage import tracks_from_depth
    from stages.write import shard_bytes

    _, cfg = demo
    rcfg = cfg.resolved()
    plan = make_plan(rcfg)
    rows = {r["dataset"]: r for r in demo_report["datasets"]}
    for name in ("pointodyssey", "tartanair"):
        actual = 0
        for sh in (s for s in plan.shards if s["dataset"] == name):
            samples = []
            for c in (c for c in plan.clips if c["shard_id"] == sh["shard_id"]):
                clip = ingest_clip(c, plan.scene_refs[(name, c["scene"])], rcfg)
                if rcfg.datasets[name].track_source == "depth_static":
                    clip = tracks_from_depth(clip, rcfg)
                samples.append(encode_clip(clip, rcfg.jpeg_quality))
            actual += len(shard_bytes(samples)[0])
        assert rows[name]["output_bytes"] == pytest.approx(actual, rel=0.25), name


# ------------------------------------------------------------------------------------------
# Costs file


def _write(tmp_path, raw) -> Path:
    p = tmp_path / "costs.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize(
    "edit, field, what",
    [
        (lambda c: c["depth"].pop("frames_per_s"), "depth.frames_per_s", "missing"),
        (
            lambda c: c["tracks"]["point_frames_per_s"]["offline"].__setitem__("bf16", "fast"),
            "tracks.point_frames_per_s.offline.bf16",
            "positive number",
        ),
        (lambda c: c["megasam"].__setitem__("gpu_s_per_frame", -1.0), "megasam.gpu_s_per_frame", "positive number"),
        (lambda c: c["depth"].__setitem__("reference_hw", [518]), "depth.reference_hw", "[height, width]"),
        (
            lambda c: c["output"]["rgb_bytes_per_pixel"].__setitem__(0, 3),
            "output.rgb_bytes_per_pixel.0",
            "[pixels, bytes_per_pixel]",
        ),
    ],
)
def test_bad_costs_file_names_the_field(tmp_path, edit, field, what):
    raw = costs_raw()
    edit(raw)
    path = _write(tmp_path, raw)
    cfg = BuildConfig.model_validate({"output": "x", "datasets": {"realestate10k": {"root": "x"}}})
    with pytest.raises(CostsError) as exc:
        projection_from_counts(
            [{"dataset": "realestate10k", "scenes": 1, "frames_per_scene": 120}], cfg=cfg, costs=path
        )
    msg = str(exc.value)
    assert field in msg and what in msg and str(path) in msg
    assert isinstance(exc.value, ConfigError)  # the CLI prints ConfigErrors as one line


def test_costs_missing_entry_for_the_configured_model(tmp_path, demo):
    raw = costs_raw()
    del raw["depth"]["frames_per_s"]["vitl"]
    cfg = BuildConfig.model_validate(
        {"output": "x", "datasets": {"realestate10k": {"root": "x"}}}
    )  # default encoder vitl
    with pytest.raises(CostsError, match=r"depth\.frames_per_s\.vitl\.fp16' is missing"):
        projection_from_counts(
            [{"dataset": "realestate10k", "scenes": 1, "frames_per_scene": 120}], cfg=cfg, costs=_write(tmp_path, raw)
        )
    with pytest.raises(CostsError, match="costs file not found"):
        capacity_report(demo[1], costs=tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("depth: [unclosed\n")
    with pytest.raises(CostsError, match="not valid YAML"):
        capacity_report(demo[1], costs=tmp_path / "bad.yaml")


def test_every_assumed_figure_used_is_listed():
    rep = projection_from_counts(FULL_BUILD_COUNTS)
    text = "\n".join(rep["assumptions"])
    raw = costs_raw()
    # figures of the full build that are not measurements
    assert "megasam.gpu_s_per_frame" in text
    assert "datasets.stereo4d.gt_tracks" in text and "datasets.realestate10k" in text
    # ... but not the unmeasured ViT-B figures, which the default (vitl) config never uses
    assert "vitb" not in text
    assert isinstance(raw["depth"]["frames_per_s"]["vitb"]["fp16"], dict)


# ------------------------------------------------------------------------------------------
# The full-build figures in docs/CLUSTER.md


def test_full_build_counts_total_130k_and_docs_table_is_current():
    assert sum(r["scenes"] for r in FULL_BUILD_COUNTS) == 130_000
    doc = (ROOT / "docs" / "CLUSTER.md").read_text()
    section = doc.split("## Capacity planning (`d4s plan`)", 1)
    assert len(section) == 2, "docs/CLUSTER.md lacks its capacity planning section"
    assert full_build_markdown() in section[1], (
        "docs/CLUSTER.md full-build table is stale: regenerate with d4s plan --full-build --markdown"
    )


def test_plan_full_build_and_counts_from_the_d4s_command(tmp_path):
    from pipeline.cli import app

    res = runner.invoke(app, ["plan", "--full-build", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["totals"]["scenes"] == sum(r["scenes"] for r in FULL_BUILD_COUNTS) and rep["mode"] == "projection"
    res = runner.invoke(app, ["plan", "--full-build", "--markdown"])
    assert res.exit_code == 0 and res.stdout.strip() == full_build_markdown()
    counts = tmp_path / "counts.yaml"
    counts.write_text(yaml.safe_dump([{"dataset": "kubric_movi_f", "scenes": 10, "frames_per_scene": 24}]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "output": "x",
                "datasets": {"kubric_movi_f": {"root": "/not/read"}},
                "stages": {"tracks": {"grid_size": 8}},
            }
        )
    )
    res = runner.invoke(app, ["plan", str(cfg), "--counts", str(counts), "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["datasets"]
    assert row["clips"] == 10 and row["tracks_per_clip"] == 3 * 8**2  # the config's grid, 3 query frames
    counts.write_text("- {dataset: kubric_movi_f}\n")
    res = runner.invoke(app, ["plan", "--counts", str(counts)])
    assert res.exit_code == 2 and "expected a list of {dataset, scenes, frames_per_scene} rows" in res.output


def test_costs_file_typos_and_unknown_datasets_fail_at_load(tmp_path):
    raw = costs_raw()
    raw["depth"]["frames_per_s"]["vitll"] = raw["depth"]["frames_per_s"].pop("vitl")
    with pytest.raises(CostsError, match=r"depth\.frames_per_s\.vitll.*not allowed.*did you mean 'vitl'"):
        projection_from_counts(
            [{"dataset": "realestate10k", "scenes": 1, "frames_per_scene": 40}], costs=_write(tmp_path, raw)
        )
    raw = costs_raw()
    raw["cpu"]["ms_per_frame"]["ingset"] = raw["cpu"]["ms_per_frame"].pop("ingest")
    with pytest.raises(CostsError, match=r"cpu\.ms_per_frame\.(ingset|ingest)"):
        projection_from_counts(
            [{"dataset": "realestate10k", "scenes": 1, "frames_per_scene": 40}], costs=_write(tmp_path, raw)
        )
    raw = costs_raw()
    raw["datasets"]["vkitti"] = raw["datasets"]["vkitti2"]
    with pytest.raises(CostsError, match=r"field 'datasets'.*vkitti"):
        projection_from_counts(
            [{"dataset": "realestate10k", "scenes": 1, "frames_per_scene": 40}], costs=_write(tmp_path, raw)
        )


def test_a_depth_png_level_other_than_the_measured_one_is_named_in_the_assumptions(demo):
    _, cfg = demo
    one = with_datasets(cfg, tartanair={})
    same = capacity_report(one)["assumptions"]
    assert not any("depth_png_level" in a for a in same)
    fast = BuildConfig.model_validate({**one.model_dump(mode="json"), "depth_png_level": 1})
    notes = [a for a in capacity_report(fast)["assumptions"] if "depth_png_level" in a]
    assert notes == [
        "depth_png_level is 1 but the depth byte figures (and the encode CPU figure) were measured at 6: "
        "neither is adjusted for it."
    ]


def test_ingest_cpu_counts_the_frames_read_once_per_scene_where_clips_are_read_together(demo):
    """RealEstate10K's clips of a scene are read together (tests/test_scene_ingest.py), each shared
    frame once: the plan's ingest CPU follows the scene's distinct frames, encode the clips' frames."""
    _, cfg = demo
    together = capacity_report(with_datasets(cfg, realestate10k={}))["datasets"][0]
    assert together["model_frames"] < together["frames"], "premise: the demo clips share frames"
    raw = with_datasets(cfg, realestate10k={}).model_dump(mode="json")
    raw["stages"]["scene"]["granularity"] = "clip"
    alone = capacity_report(BuildConfig.model_validate(raw))["datasets"][0]
    cpu_t, cpu_a = together["cpu_core_hours"], alone["cpu_core_hours"]
    assert cpu_t["ingest"] == pytest.approx(cpu_a["ingest"] * together["model_frames"] / together["frames"], rel=1e-12)
    assert cpu_t["encode"] == pytest.approx(cpu_a["encode"], rel=1e-12)
