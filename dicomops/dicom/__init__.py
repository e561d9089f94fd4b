"""Safe DICOM reading (``reader``), the header walk (``fastheader``), the forms of VR values
(``forms``), the isolated parallel map (``parallel``), and series assembly with geometry checks
(``series``). Import the submodule you need: worker processes import ``reader`` alone, which keeps
their start-up light."""
