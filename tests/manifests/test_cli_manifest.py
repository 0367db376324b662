"""``segapp manifest create|validate`` through the CLI: exit codes and one line per problem naming its file."""

import json
import shutil

from conftest import SAMPLE_MANIFEST

from app.cli import main


def test_manifest_create_then_validate_reports_each_problem(tmp_path, capsys):
    root = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for f in sorted((SAMPLE_MANIFEST.parent / sub).glob("*.nii.gz"))[:6]:
            shutil.copy(f, root / sub / f.name)
    m = tmp_path / "m.json"
    assert (
        main(
            [
                "manifest",
                "create",
                str(root),
                "-o",
                str(m),
                "--name",
                "t",
                "--labels",
                "0=background",
                "1=anterior",
                "2=posterior",
            ]
        )
        == 0
    )
    doc = json.loads(m.read_text())
    assert len(doc["cases"]) == 6 and doc["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert main(["manifest", "validate", str(m)]) == 0
    capsys.readouterr()
    victim = sorted((root / "imagesTr").glob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated file
    (root / "labelsTr" / sorted((root / "labelsTr").glob("*.nii.gz"))[1].name).unlink()  # missing file
    assert main(["manifest", "validate", str(m)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert any(victim.name in line and "checksum" in line.lower() for line in out)
    assert any("missing" in line.lower() for line in out)
