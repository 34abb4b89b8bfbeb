"""Write ``nstreams_reference.pt``: outputs of the two-stream AQCFNet as built before the N-stream change.

Run on the code before the change (commit 2f547f9), e.g. with that commit's ``aqcf`` package
unpacked by ``git archive 2f547f9 aqcf | tar -x -C /tmp/old`` and
``PYTHONPATH=/tmp/old .venv/bin/python tests/data/make_nstreams_reference.py``.
``tests/test_nstreams.py`` loads the file and checks that the N-stream code, built for ("ct", "mri"),
gives the same state-dict keys and bit-identical outputs. One thread, as in the tests
(tests/conftest.py): CPU convolutions sum in another order with more threads. Kept for the record:
rerunning it on the new code would compare the new code with itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aqcf.networks.aqcfnet import AQCFNet

OUT = Path(__file__).with_name("nstreams_reference.pt")
# every argument the readings change is explicit, so a change of defaults does not move the reference
KWARGS = {
    "widths": (1, 2, 2, 2),
    "bottleneck": "shared",
    "fusion_out_kernel": 3,
    "encoder_convs": 2,
    "decoder_convs": 2,
    "bottleneck_convs": 2,
    "quaternion_product": "dense",
}
PATCH = (1, 1, 8, 4, 12)


def reference(fusion_weights: str) -> dict:
    torch.manual_seed(0)
    net = AQCFNet(**KWARGS, fusion_weights=fusion_weights).eval()
    with torch.no_grad():  # learned norm shifts: the zero-filled stream is then not zero inside
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.bias.normal_()
    ct, mri = torch.randn(PATCH), torch.randn(PATCH)
    state = net.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    # one flat tensor instead of one file entry per tensor in the archive (keeps the file small)
    out = {
        "names": list(state),
        "shapes": [tuple(v.shape) for v in state.values()],
        "flat": torch.cat([v.flatten() for v in state.values()]),
        "ct": ct,
        "mri": mri,
    }
    with torch.no_grad():
        out["forward"] = net(ct, mri)
        out["last_gates"] = dict(net.last_gates)
        out["last_context_rms"] = dict(net.last_context_rms)
        for mode in ("zero-filled", "off"):
            for modality, x in (("ct", ct), ("mri", mri)):
                out[f"single/{modality}/{mode}"] = net.forward_single(x, modality, absent_context=mode)
                out[f"single_gates/{modality}/{mode}"] = dict(net.last_gates)
    return out


def main() -> None:
    torch.set_num_threads(1)
    torch.save({"kwargs": KWARGS, **{w: reference(w) for w in ("separate", "shared")}}, OUT)
    print(f"{OUT}: {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
