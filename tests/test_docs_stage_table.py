"""docs/grammar.md carries the stage table the registry renders (`kvwire profiles` prints the same)."""

from pathlib import Path

from common.profile.docs import stage_table

GRAMMAR = Path(__file__).resolve().parents[1] / "docs" / "grammar.md"


def test_the_docs_stage_table_is_the_registrys():
    text = GRAMMAR.read_text()
    copied = text.split("<!-- stage table: begin -->\n", 1)[1].split("\n<!-- stage table: end -->", 1)[0]
    assert copied == stage_table(), "regenerate the table in docs/grammar.md from common.profile.docs.stage_table()"
