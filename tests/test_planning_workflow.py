"""plan_case end to end on a small water phantom: beams → dij → optimisation → sequencing → DICOM."""

import numpy as np
import pytest

from dicom_validate import dciodvfy_report
from twinrt import dvh
from twinrt.dicom.folder import export_case, import_case
from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Case, Image, Prescription, Structure, StructureType
from twinrt.planning.plan import PlanBeam
from twinrt.planning.workflow import PlanSetup, default_objectives, mu_per_unit_weight, plan_case


def phantom_case(target_offset_mm=(0.0, 0.0, 0.0)) -> Case:
    """A 160 mm water cylinder-ish box with a 30 mm cubic target and an organ beside it."""
    grid = Grid((32, 40, 40), (4.0, 4.0, 4.0), (-78.0, -78.0, -62.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    pts = grid.index_to_lps(np.stack([i, j, k], -1).astype(float))
    body = (pts[..., 0] ** 2 + pts[..., 1] ** 2) < 70.0 ** 2
    hu = np.where(body, 0, -1000).astype(np.int16)
    off = np.asarray(target_offset_mm)
    target = np.all(np.abs(pts - off) <= 15.0, axis=-1)
    organ = (np.abs(pts[..., 0] - 35.0) <= 8) & (np.abs(pts[..., 1]) <= 8) & (np.abs(pts[..., 2]) <= 20)
    structures = [Structure("PTV", target, grid, (255, 0, 0), StructureType.TARGET),
                  Structure("Organ", organ & body, grid, (0, 255, 0), StructureType.ORGAN),
                  Structure("Body", body, grid, (200, 200, 200), StructureType.EXTERNAL)]
    return Case("PHANTOM", Image(hu, grid), structures, {}, [],
                {"prescriptions": [Prescription("PTV", 60.0, 30)], "patient_name": "Phantom^Water"})


@pytest.fixture(scope="module")
def planned():
    case = phantom_case()
    setup = PlanSetup.equispaced(5, dose_grid_mm=4.0, max_iter=80, levels=8)
    return case, plan_case(case, setup=setup)


def test_plan_meets_prescription_and_spares_the_organ(planned):
    case, res = planned
    for dose in (res.optimized_dose, res.dose):
        ptv = dvh.structure_dvh(dose, case.structure("PTV"), sampling="dose")
        organ = dvh.structure_dvh(dose, case.structure("Organ"), sampling="dose")
        assert 57.0 < ptv.mean_gy < 63.0
        assert ptv.dose_at_volume_percent(95) > 0.85 * 60.0
        assert organ.mean_gy < 0.6 * ptv.mean_gy
    assert res.sequencing["relative_dose_error"] < 0.1
    assert res.timings_s.keys() >= {"rays_s", "dij_s", "optimization_s", "sequencing_s"}


def test_plan_is_deliverable_and_unapproved(planned):
    _, res = planned
    plan = res.plan
    assert plan.approval == "UNAPPROVED"
    assert plan.prescriptions[0].fractions == 30
    assert len(plan.beams) == 5 and all(isinstance(b, PlanBeam) for b in plan.beams)
    assert sorted(b.beam.gantry_deg for b in plan.beams) == [0.0, 72.0, 144.0, 216.0, 288.0]
    for b in plan.beams:
        assert b.segments and all(s.mu > 0 for s in b.segments)
        assert 0 < b.meterset_mu < 1000  # MU per fraction for 2 Gy/fraction


def test_plan_exports_valid_rtplan_and_rtdose(planned, tmp_path):
    case, res = planned
    case = Case(case.patient_id, case.ct, case.structures, {"planned": res.dose}, [res.plan], dict(case.metadata))
    files = export_case(case, tmp_path / "out")
    for kind in ("rtplan", "rtdose"):
        for path in files[kind]:
            errors, _ = dciodvfy_report(path)
            assert errors == [], (kind, errors)
    back = import_case(tmp_path / "out")
    assert [b.beam.gantry_deg for b in back.plans[0].beams] == [b.beam.gantry_deg for b in res.plan.beams]
    assert abs(back.doses["planned"].max_gy - res.dose.max_gy) < 1e-3 * res.dose.max_gy


def test_mu_calibration_is_positive_and_deterministic():
    a = mu_per_unit_weight(5.0, 50.0)
    mu_per_unit_weight.cache_clear()
    assert a > 0 and mu_per_unit_weight(5.0, 50.0) == a


def test_default_objectives_cover_targets_organs_and_body():
    objs = default_objectives(phantom_case())
    kinds = {(o["structure"], o["kind"]) for o in objs}
    assert ("PTV", "squared_deviation") in kinds and ("Organ", "squared_overdose") in kinds
    assert ("Body", "squared_overdose") in kinds


def test_setup_round_trips_and_refuses_unknown_keys():
    s = PlanSetup.equispaced(7, 10.0, dose_grid_mm=3.0)
    assert PlanSetup.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidInputError, match="Unknown"):
        PlanSetup.from_dict({"beams": 3})
    with pytest.raises(InvalidInputError):
        PlanSetup.equispaced(0)


def test_bad_input_is_refused_with_typed_errors():
    case = phantom_case()
    no_rx = Case(case.patient_id, case.ct, case.structures, {}, [], {})
    with pytest.raises(InvalidInputError, match="no prescription"):
        plan_case(no_rx)
    with pytest.raises(StructureError, match="Nope"):
        plan_case(case, prescriptions=[Prescription("Nope", 60.0, 30)])
    empty = phantom_case()
    empty.structures[0] = Structure("PTV", np.zeros(case.ct.grid.shape, bool), case.ct.grid, type=StructureType.TARGET)
    with pytest.raises(StructureError, match="empty"):
        plan_case(empty)
    outside = phantom_case(target_offset_mm=(-70.0, -70.0, 0.0))  # in the air beside the body
    assert outside.structure("PTV").mask.any()
    with pytest.raises(StructureError, match="outside the body"):
        plan_case(outside)


def test_plan_command_writes_a_plan_and_refuses_an_incomplete_prescription(tmp_path, capsys):
    from twinrt.cli import main

    case = phantom_case()
    export_case(case, tmp_path / "in")
    base = ["plan", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--beams", "3", "--dose-grid-mm", "4",
            "--max-iter", "30", "--target", "PTV"]
    assert main(base) == 2
    assert "--dose-gy" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(base + ["--dose-gy", "60", "--fractions", "30"]) == 0
    back = import_case(tmp_path / "out")
    assert "planned" in back.doses and len(back.plans[0].beams) == 3
    assert back.plans[0].approval == "UNAPPROVED"
