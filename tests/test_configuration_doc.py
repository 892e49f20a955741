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
