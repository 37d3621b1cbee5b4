from pathlib import Path

from pipeline.contracts_doc import render

ROOT = Path(__file__).resolve().parents[1]


def test_stage_contract_doc_is_current():
    assert (ROOT / "docs" / "STAGES.md").read_text() == render(), (
        "run: python -m pipeline.contracts_doc > docs/STAGES.md"
    )


def test_manifest_doc_names_every_column():
    from manifests import schemas

    text = (ROOT / "docs" / "MANIFESTS.md").read_text()
    for schema in (
        schemas.SCENE_SCHEMA,
        schemas.CLIP_SCHEMA,
        schemas.SHARD_SCHEMA,
        schemas.LEDGER_SCHEMA,
        schemas.INDEX_SCHEMA,
    ):
        for name in schema.names:
            assert f"`{name}`" in text, f"docs/MANIFESTS.md does not document column {name}"


def test_config_doc_is_current():
    from pipeline.config_doc import render as render_config

    assert (ROOT / "docs" / "CONFIG.md").read_text() == render_config(), (
        "run: python -m pipeline.config_doc > docs/CONFIG.md"
    )


def _tables(markdown: str) -> list[list[list[str]]]:
    """The body rows (cell texts) of every table, as a GFM renderer splits them (markdown-it-py)."""
    from markdown_it import MarkdownIt

    tables, rows, cells, in_body = [], None, None, False
    for tok in MarkdownIt("commonmark").enable("table").parse(markdown):
        if tok.type == "table_open":
            rows = []
        elif tok.type == "tbody_open":
            in_body = True
        elif tok.type == "tr_open":
            cells = []
        elif tok.type == "inline" and cells is not None:
            cells.append(tok.content)
        elif tok.type == "tr_close":
            if in_body:
                rows.append(cells)
            cells = None
        elif tok.type == "table_close":
            tables.append(rows)
            in_body = False
    return tables


def test_generated_tables_read_back_cell_by_cell():
    """A `|` inside a cell must be escaped: unescaped, it splits the row and a GFM renderer drops the
    excess cells. Every generated row must read back (markdown-it-py) exactly as the code declares it."""
    import importlib

    from pipeline import config_doc
    from pipeline.contracts_doc import STAGE_MODULES, md_cell
    from stages.ingest import ADAPTERS

    stage_rows, route_rows = _tables(render())  # the stage contracts, then the routes per dataset
    rows = {cells[0]: cells for cells in stage_rows}
    for module in STAGE_MODULES:
        c = importlib.import_module(module).CONTRACT
        assert rows[c.name] == [c.name, ", ".join(c.inputs), ", ".join(c.outputs), c.runs_as, c.acts_when, c.errors]
    # a cell holding "|" reads back whole (no contract holds one today: check the escaping itself)
    (probe,) = _tables("| a | b |\n|---|---|\n| " + md_cell("x | y") + " | z |\n")
    assert probe == [["x | y", "z"]]
    assert [cells[0] for cells in route_rows] == sorted(ADAPTERS)
    tables = _tables(config_doc.render())
    assert len(tables) > len(config_doc.MODELS)  # and the thresholds and every adapter's options
    for model, table in zip(config_doc.MODELS, tables):
        described = {cells[0].strip("`"): cells[3] for cells in table}
        for name, f in model.model_fields.items():
            assert described[name] == (f.description or ""), f"{model.__name__}.{name}"
