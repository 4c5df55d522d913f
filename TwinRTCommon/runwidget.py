"""The Widget half of a long-running stage: an Apply button that becomes Cancel, a progress bar.

Mixed into the Widgets whose stage runs long (AIPlanner, DosePredict) next to
:class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; their .ui has ``applyButton`` and
``progressBar`` and the collapsible sections named in :attr:`RunningWidgetMixin.lockedWhileRunning`.
"""

import slicer


class RunningWidgetMixin:
    """Progress and the Apply/Cancel state of a Widget whose Logic reports ``progress(fraction, text)``."""

    #: Apply-button text while idle (each module sets translated text), and the ``self.ui``
    #: collapsible sections locked while its stage runs.
    applyIdleText = ""
    lockedWhileRunning: tuple[str, ...] = ("patientCollapsibleButton", "inputsCollapsibleButton")

    def onProgress(self, fraction: float, text: str) -> None:
        """Progress callback of the Logic: update the bar and let Qt process the Cancel click."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{text} (%p%)")
        slicer.app.processEvents()

    def setRunning(self, running: bool) -> None:
        """Apply becomes Cancel while the stage runs; the :attr:`lockedWhileRunning` sections are locked."""
        from slicer.i18n import tr as _

        self.ui.applyButton.text = _("Cancel") if running else self.applyIdleText
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        for name in self.lockedWhileRunning:
            getattr(self.ui, name).enabled = not running
