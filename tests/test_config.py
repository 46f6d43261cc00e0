"""Settings: defaults in one place, profiles, environment and --set layering, fail-fast errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeit_spark.config import Settings, SettingsError, describe, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_default_profile_equals_the_declared_defaults():
    on_disk = yaml.safe_load((REPO / "conf" / "default.yaml").read_text())
    assert on_disk == Settings().to_dict()


@pytest.mark.parametrize("profile", ["default.yaml", "local.yaml", "cluster.yaml"])
def test_every_profile_loads(profile):
    settings = load_settings([REPO / "conf" / profile], env={})
    assert isinstance(settings, Settings)


def test_layers_apply_in_order(tmp_path):
    conf = tmp_path / "p.yaml"
    conf.write_text("topics:\n  k: 7\ndedup:\n  threshold: 0.9\nllm:\n  concurrency: 3\n")
    env = {"MERGEIT__TOPICS__K": "9", "MERGEIT__SELECT__BUDGET": "10", "UNRELATED": "x"}
    s = load_settings([conf], ["topics.k=11", "input.paths=a.json", "spark.conf={'spark.x': 1}"], env=env)
    assert s.topics.k == 11                 # --set beats environment beats profile
    assert s.select.budget == 10            # environment beats default
    assert s.dedup.threshold == 0.9         # profile beats default
    assert s.llm.concurrency == 3
    assert s.input.paths == ["a.json"]      # a single path becomes a list
    assert s.spark.conf == {"spark.x": "1"}
    assert s.group.threshold == 0.55        # untouched default (the paper's value)


def test_int_accepted_for_float_and_text_kept_verbatim():
    s = load_settings(overrides=["gate.min_output_ratio=1", "llm.model=0123"], env={})
    assert s.gate.min_output_ratio == 1.0 and isinstance(s.gate.min_output_ratio, float)
    assert s.llm.model == "0123"


@pytest.mark.parametrize("override, named", [
    ("topics.kk=3", "topics.kk"),                      # unknown key
    ("topicz.k=3", "topicz.k"),                        # unknown section
    ("topics.k=three", "topics.k"),                    # wrong type
    ("topics.k=-1", "topics.k"),                       # out of range
    ("dedup.threshold=1.5", "dedup.threshold"),        # out of range
    ("dedup.cross_cluster=maybe", "dedup.cross_cluster"),
    ("input.format=xml", "input.format"),
    ("group.size=1", "group.size"),
    ("noequals", "noequals"),
])
def test_bad_settings_fail_fast_naming_the_key(override, named):
    with pytest.raises(SettingsError) as err:
        load_settings(overrides=[override], env={})
    assert named in str(err.value)


def test_bad_profile_and_env_name_their_origin(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("select:\n  budgett: 3\n")
    with pytest.raises(SettingsError, match=r"select\.budgett.*bad\.yaml"):
        load_settings([bad], env={})
    with pytest.raises(SettingsError, match="not found"):
        load_settings([tmp_path / "missing.yaml"], env={})
    with pytest.raises(SettingsError, match="MERGEIT__LLM__TIMEOUT"):
        load_settings(env={"MERGEIT__LLM__TIMEOUT": "3"})


def test_every_knob_is_documented():
    rows = describe()
    assert len(rows) > 50
    assert all(doc.strip() for _, _, doc in rows), [k for k, _, d in rows if not d.strip()]


def test_fingerprint_follows_only_named_sections():
    a = load_settings(env={})
    b = load_settings(overrides=["llm.temperature=0.7"], env={})
    assert a.fingerprint("topics", "dedup") == b.fingerprint("topics", "dedup")
    assert a.fingerprint("llm") != b.fingerprint("llm")


def test_no_secret_settings_exist():
    # The key itself is never a setting: only the name of the variable or file that holds it.
    keys = [k for k, _, _ in describe()]
    assert "llm.api_key" not in keys
    assert {"llm.api_key_env", "llm.api_key_file"} <= set(keys)
