from pathlib import Path

from pipeline.contracts_doc import render

ROOT = Path(__file__).resolve().parents[1]


def test_stage_contract_doc_is_current():
    assert (ROOT / "docs" / "STAGES.md").read_text() == render(), "run: python -m pipeline.contracts_doc > docs/STAGES.md"


def test_manifest_doc_names_every_column():
    from manifests import schemas

    text = (ROOT / "docs" / "MANIFESTS.md").read_text()
    for schema in (schemas.SCENE_SCHEMA, schemas.CLIP_SCHEMA, schemas.SHARD_SCHEMA, schemas.LEDGER_SCHEMA, schemas.INDEX_SCHEMA):
        for name in schema.names:
            assert f"`{name}`" in text, f"docs/MANIFESTS.md does not document column {name}"


def test_config_doc_is_current():
    from pipeline.config_doc import render as render_config

    assert (ROOT / "docs" / "CONFIG.md").read_text() == render_config(), "run: python -m pipeline.config_doc > docs/CONFIG.md"
