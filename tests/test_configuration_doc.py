"""docs/configuration.md documents every configuration key, and is what its generator writes from config.py now."""

from conftest import REPO_ROOT, load_docs_script

import config


def test_every_key_has_a_meaning_and_every_meaning_a_key():
    keys = {f"{section}.{name}" for section, entries in config.DEFAULTS.items() for name in entries}
    assert sorted(keys - set(config.KEY_DOCS)) == [], "keys without a KEY_DOCS line"
    assert sorted(set(config.KEY_DOCS) - keys) == [], "KEY_DOCS lines for keys DEFAULTS lacks"
    assert all(meaning.strip() for meaning in config.KEY_DOCS.values())


def test_configuration_doc_is_current():
    generated = load_docs_script("make_configuration_doc").configuration_doc()
    written = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert written == generated, "docs/configuration.md is out of date: run python docs/make_configuration_doc.py"


def test_the_resume_table_lists_every_key_on_the_side_the_code_puts_it():
    """docs/troubleshooting.md's table of keys --resume refuses (checkpoint.FIXED_ON_RESUME) and keys that take
    effect: every configuration key, on its own side, once."""
    import re

    from checkpoint import FIXED_ON_RESUME

    text = (REPO_ROOT / "docs/troubleshooting.md").read_text()
    row = text.split("| refused on resume | take effect on resume |\n|---|---|\n")[1].splitlines()[0]
    refused_cell, effect_cell = row.strip("| ").split(" | ")
    refused, effect = (re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", cell) for cell in (refused_cell, effect_cell))
    every_key = {f"{section}.{key}" for section, values in config.DEFAULTS.items() for key in values}
    assert sorted(refused) == sorted(FIXED_ON_RESUME)
    assert sorted(effect) == sorted(every_key - set(FIXED_ON_RESUME))
