"""docs/configuration.md documents every configuration key, and is what its generator writes from config.py now."""

import importlib.util

from conftest import REPO_ROOT

import config


def load_generator():
    path = REPO_ROOT / "docs" / "make_configuration_doc.py"
    spec = importlib.util.spec_from_file_location("make_configuration_doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_key_has_a_meaning_and_every_meaning_a_key():
    keys = {f"{section}.{name}" for section, entries in config.DEFAULTS.items() for name in entries}
    assert sorted(keys - set(config.KEY_DOCS)) == [], "keys without a KEY_DOCS line"
    assert sorted(set(config.KEY_DOCS) - keys) == [], "KEY_DOCS lines for keys DEFAULTS lacks"
    assert all(meaning.strip() for meaning in config.KEY_DOCS.values())


def test_configuration_doc_is_current():
    generated = load_generator().configuration_doc()
    written = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert written == generated, "docs/configuration.md is out of date: run python docs/make_configuration_doc.py"
