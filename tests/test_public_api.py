"""The public names stay where users import them from, whatever module defines them."""

from __future__ import annotations

import pytest

import qbackend
import qbackend.qat
import qbackend.smoothquant


@pytest.mark.parametrize("module", [qbackend, qbackend.qat, qbackend.smoothquant], ids=lambda m: m.__name__)
def test_every_public_name_resolves(module):
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    for name in ("save", "load", "export_mlir", "from_pretrained", "save_pretrained") if module is qbackend else ():
        assert callable(getattr(module, name))


def test_public_names_are_the_workflow_objects():
    from qbackend.passes import calibration
    from qbackend.passes import calibration_result as result
    from qbackend.workflows.qat import api, lora
    from qbackend.workflows.w8a8 import linear
    from qbackend.workflows.weight_only import linear as wo_linear

    assert qbackend.convert is qbackend.qat.convert is api.convert
    assert qbackend.qat.add_lora is lora.add_lora
    assert qbackend.calibrate is qbackend.smoothquant.calibrate is calibration.calibrate
    assert qbackend.CalibrationResult is qbackend.smoothquant.CalibrationResult is result.CalibrationResult
    assert qbackend.W8A8Linear is linear.W8A8Linear and qbackend.QuantizedLinear is wo_linear.QuantizedLinear
    with pytest.raises(AttributeError):
        qbackend.smoothquant.nope  # noqa: B018
