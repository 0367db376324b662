"""The node config: the example of docs/node.md parses as TOML and as the same YAML; every mistake is one
ConfigError naming the file and the section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.errors import ConfigError
from app.node.config import load_config

REPO = Path(__file__).resolve().parents[2]


def docs_example() -> str:
    """The ```toml block of docs/node.md."""
    text = (REPO / "docs" / "node.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    return block


def test_the_documented_example(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(docs_example())
    cfg = load_config(path)
    assert (cfg.ae_title, cfg.port, cfg.allowed_calling_aets) == ("SEGAPP", 11112, ("PACS",))
    assert cfg.spool == tmp_path / "spool" and cfg.state == tmp_path / "state"  # relative to the config
    assert cfg.destinations == ("dimse://PACS@pacs.example:104",)
    assert set(cfg.bundles) == {"hippo"} and cfg.bundles["hippo"].formats == ("seg", "stats", "sr")
    assert cfg.bundles["hippo"].bundle == "hippocampus_unet3d"  # a name stays a name
    assert [(r.bundle, r.rules) for r in cfg.routes] == [
        ("hippo", {"modality": ["MR"], "description_regex": "t1", "min_slices": 8})
    ]
    assert (cfg.http_host, cfg.http_port, cfg.stow) == ("127.0.0.1", 8080, False)
    assert cfg.destinations_for("hippo") == cfg.destinations


def test_yaml_reads_the_same(tmp_path):
    toml_path = tmp_path / "node.toml"
    toml_path.write_text(docs_example())
    import tomllib

    yaml_path = tmp_path / "node.yaml"
    yaml_path.write_text(yaml.safe_dump(tomllib.loads(docs_example())))
    a, b = load_config(toml_path), load_config(yaml_path)
    assert {k: v for k, v in vars(a).items() if k != "source"} == {k: v for k, v in vars(b).items() if k != "source"}


BASE = """
[node]
allowed_calling_aets = ["PACS"]
{node}
[bundles.b]
bundle = "hippocampus_unet3d"
{bundle}
{rest}
"""


@pytest.mark.parametrize(
    ("node", "bundle", "rest", "words"),
    [
        ("colour = 1", "", "", "unknown key(s) ['colour'] in [node]"),
        ("port = 'x'", "", "", "[node] port must be int"),
        ("workers = 0", "", "", "workers must be at least 1"),
        ("ae_title = 'MUCH_TOO_LONG_AE_TITLE'", "", "", "ae_title"),
        ("destinations = ['ftp://x:1/y']", "", "", "[node] destinations: unknown destination scheme"),
        ("spool = 'same'\nstate = 'same'", "", "", "different folders"),
        ("", "formats = ['sr']", "", "the SR references the SEG"),
        ("", "formats = ['png']", "", "choose from nifti, seg, rtstruct, stats, sr"),
        ("", "weights = 'w.pt'", "", "unknown key(s) ['weights'] in [bundles.b]"),
        ("", "", "[[routes]]\nbundle = 'nope'", "[[routes]] #1 needs bundle = one of ['b']"),
        ("", "", "[[routes]]\nbundle = 'b'\ndescription_regex = '('", "[[routes]] #1: bad description_regex"),
        ("", "", "[[routes]]\nbundle = 'b'\nslice_thickness = 3", "unknown series selection rule"),
        ("", "", "[extra]\na = 1", "unknown section(s) ['extra']"),
    ],
)
def test_mistakes_are_one_line(tmp_path, node, bundle, rest, words):
    path = tmp_path / "node.toml"
    path.write_text(BASE.format(node=node, bundle=bundle, rest=rest))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message


def test_missing_pieces(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[node]\nport = 104\n[bundles.b]\nbundle = 'x'\n")
    with pytest.raises(ConfigError, match="allowed_calling_aets"):
        load_config(path)
    path.write_text("[node]\nallowed_calling_aets = ['*']\n")
    with pytest.raises(ConfigError, match=r"\[bundles.NAME\]"):
        load_config(path)
    path.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    path.write_text("[node]\nallowed_calling_aets = ['*']\n[bundles.b]\nrun = 'runs/r1'\n")
    cfg = load_config(path)
    assert cfg.any_calling_aet and cfg.bundles["b"].run == str(tmp_path / "runs" / "r1")
