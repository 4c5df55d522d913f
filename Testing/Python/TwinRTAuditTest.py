"""The audit log and plan review survive case -> scene -> .mrb -> scene -> case.

Runs in Slicer as a ctest (``slicer_add_python_unittest`` in this folder's CMakeLists.txt) and
headless under pytest with slicer-core through ``slicer_harness``, like TwinRTWorkflowTest.py.
"""

import json
import sys
import tempfile
import unittest
from pathlib import Path

try:
    import slicer
except ImportError as exc:  # plain Python without slicer-core: skip, as the module tests do
    raise unittest.SkipTest("slicer-core is not installed (pip install 'twinrt[slicer]')") from exc

try:  # headless: the harness lives beside this file; in Slicer it is neither needed nor installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slicer_harness
except ImportError:
    slicer_harness = None

from TwinRTCommon import mrmlio  # noqa: E402
from TwinRTCommon.scene import isRealSlicer  # noqa: E402
from TwinRTCommon.testing import makeSyntheticCase  # noqa: E402
from twinrt.audit import AuditLog, AuditLogError  # noqa: E402
from twinrt.model import Plan, Prescription  # noqa: E402
from twinrt.planning.approval import approve, propose  # noqa: E402


def freshScene():
    """An empty scene: ``slicer.mrmlScene`` cleared in Slicer, a new real scene headless."""
    if isRealSlicer():
        slicer.mrmlScene.Clear()
        return slicer.mrmlScene
    return slicer_harness.newScene()


class TwinRTAuditTest(unittest.TestCase):
    """``TwinRT.AuditLog`` on the study item round-trips through a bundle, hash chain intact."""

    def setUp(self):
        self.scene = freshScene()
        self.tmp = Path(tempfile.mkdtemp(prefix="twinrt-audit-"))

    def makeReviewedCase(self):
        case = makeSyntheticCase()
        log = AuditLog.of_case(case)
        log.ai_action("Contoured structures", {"model": "synthetic"})
        log.human_message("Dr. A. Reviewer", "Spare the organ more, please")
        plan = Plan("AI plan", [Prescription("Target", 60.0, 30)], [{"gantry_angle_deg": 0.0}])
        case.plans.append(plan)
        approve(propose(plan, log), log, "Reviewer^Anna", "Acceptable")
        return case

    def reload(self, name):
        path = mrmlio.saveSceneMrb(self.scene, self.tmp / name)
        return mrmlio.loadSceneMrb(path, None if isRealSlicer() else slicer_harness.newScene())

    def test_auditLogSurvivesBundle(self):
        case = self.makeReviewedCase()
        created = mrmlio.caseToScene(case, self.scene)
        sh = self.scene.GetSubjectHierarchyNode()
        text = sh.GetItemAttribute(created["studyItem"], mrmlio.AUDIT_LOG_ATTRIBUTE)
        self.assertEqual(len(text.splitlines()), 4)
        # The log has its own attribute; the case metadata JSON does not repeat it.
        self.assertNotIn("audit_log", json.loads(sh.GetItemAttribute(created["studyItem"],
                                                                     mrmlio.CASE_METADATA_ATTRIBUTE)))

        back = mrmlio.sceneToCase(self.reload("audit.mrb"))
        self.assertEqual(back.metadata["audit_log"], case.metadata["audit_log"])
        log = AuditLog.of_case(back)
        log.verify()
        self.assertEqual(log.head, AuditLog.of_case(case).head)
        self.assertEqual([e["kind"] for e in log.entries], ["ai_action", "human_message", "proposal", "approval"])
        plan = back.plans[0]
        self.assertEqual((plan.state, plan.approval, plan.reviewer_name, plan.review_comment),
                         ("approved", "APPROVED", "Reviewer^Anna", "Acceptable"))

    def test_studyAuditLogIsAppendOnly(self):
        created = mrmlio.caseToScene(self.makeReviewedCase(), self.scene)
        study = created["studyItem"]
        log = mrmlio.studyAuditLog(study, self.scene)
        stale = AuditLog.from_jsonl("".join(log.to_jsonl().splitlines(keepends=True)[:2]))
        log.ai_action("Computed DVH")
        mrmlio.setStudyAuditLog(study, log, self.scene)
        with self.assertRaises(AuditLogError):
            mrmlio.setStudyAuditLog(study, stale, self.scene)  # would drop entries
        back = mrmlio.sceneToCase(self.reload("append.mrb"))
        self.assertEqual(len(back.metadata["audit_log"]), 5)
        self.assertEqual(back.metadata["audit_log"][-1]["message"], "Computed DVH")

    def test_tamperedSceneLogStillLoadsButRefusesAppend(self):
        created = mrmlio.caseToScene(self.makeReviewedCase(), self.scene)
        sh = self.scene.GetSubjectHierarchyNode()
        text = sh.GetItemAttribute(created["studyItem"], mrmlio.AUDIT_LOG_ATTRIBUTE)
        sh.SetItemAttribute(created["studyItem"], mrmlio.AUDIT_LOG_ATTRIBUTE,
                            text.replace("Spare the organ more", "Looks fine"))
        back = mrmlio.sceneToCase(self.reload("tampered.mrb"))
        log = AuditLog.of_case(back)
        with self.assertRaises(AuditLogError):
            log.verify()
        with self.assertRaises(AuditLogError):
            log.ai_action("more")

    def test_caseWithoutLogWritesNoAttribute(self):
        created = mrmlio.caseToScene(makeSyntheticCase(), self.scene)
        sh = self.scene.GetSubjectHierarchyNode()
        self.assertEqual(sh.GetItemAttribute(created["studyItem"], mrmlio.AUDIT_LOG_ATTRIBUTE), "")
        self.assertNotIn("audit_log", mrmlio.sceneToCase(self.scene).metadata)


if __name__ == "__main__":
    unittest.main()
