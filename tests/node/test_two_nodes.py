"""Several machines: two nodes, each with its own AE title, port and state folder (its own queue), declared in
Orthanc as two modalities; Orthanc's routing sends each study to one of them; every study gets its SEG once
(one node sends back by C-STORE, the other by STOW-RS)."""

from __future__ import annotations

import pytest
from dicom_phantoms import write_phantom_series
from node_process import NodeProcess, threshold_checkpoint, write_node_config
from orthanc_rest import derived_by_study, put_modality, store_all, upload
from orthanc_server import free_port, orthanc  # noqa: F401  (session fixture)

from app.inference.jobs import series_key


@pytest.mark.slow
def test_two_nodes_behind_the_pacs_routing(orthanc, tmp_path):  # noqa: F811
    studies = [write_phantom_series(tmp_path / "src" / f"s{n}", modality="MR", shape=(16, 16, 9)) for n in range(4)]
    ckpt = threshold_checkpoint(tmp_path / "threshold.pt")
    nodes = []
    for name, destination in (("node-a", orthanc.dimse_destination), ("node-b", orthanc.dicomweb_destination)):
        port, http_port = free_port(), free_port()
        folder = tmp_path / name
        folder.mkdir()
        config = write_node_config(
            folder / "node.toml",
            ae_title=name.upper().replace("-", ""),
            port=port,
            http_port=http_port,
            allowed=[orthanc.aet],
            destinations=[destination],  # C-STORE back from one, STOW-RS from the other
            checkpoint=ckpt,
            formats=("seg",),
        )
        put_modality(orthanc, name, name.upper().replace("-", ""), port)
        nodes.append((name, NodeProcess(config, http_port, folder / "serve.log")))
    for _, node in nodes:
        node.start()
    try:
        for n, info in enumerate(studies):  # the PACS's routing: alternate between the two nodes
            (study_id,) = upload(orthanc, info.files)
            store_all(orthanc, nodes[n % 2][0], [study_id])
        finals = [node.wait_for(lambda s: s["counts"]["done"] >= 2, timeout_s=240) for _, node in nodes]
    finally:
        for _, node in nodes:
            node.stop()
    for n, final in enumerate(finals):
        assert sorted(j["series"] for j in final["done"]) == sorted(series_key(i.series_uid) for i in studies[n::2])
    segs = derived_by_study(orthanc, "SEG")
    assert all(len(segs.get(i.study_uid, [])) == 1 for i in studies)
