"""ray_cluster.yaml is checked against Ray's own launcher schema, and has the node types d4s needs."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises jsonschema.ValidationError on any schema problem
    types = raw["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["cpu_worker"]["resources"]["CPU"] >= 1 and "GPU" not in types["cpu_worker"]["resources"]
    assert raw["head_node_type"] in types
    assert any("pip install" in c and "d4s" in c for c in raw["setup_commands"])
    text = (ROOT / "ray_cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "secret" not in yaml.safe_dump(raw).lower()


def test_validation_really_rejects_a_broken_file():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    raw["available_node_types"]["cpu_worker"]["max_wrokers"] = 3  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
