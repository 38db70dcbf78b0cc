"""Drop-in deformable layers with the exact names of other code families.

* :mod:`deformcli.families.mmcv`: ``mmcv.ops`` (mmdetection 2+/3, mmcv 1.x/2.x).
* :mod:`deformcli.families.legacy_dcn`: mmdetection v1's DCN, vendored by the DB text
  detector and BasicSR (``basicsr.ops.dcn``).
* :mod:`deformcli.families.db`: DB's copy (``assets.ops.dcn``), whose ``*Pack`` layers differ.
* :mod:`deformcli.families.basicsr`: BasicSR's ``DCNv2Pack`` on top of the legacy layers.
* :mod:`deformcli.families.dcn_v2`: CharlesShang's ``DCNv2``/``DCN`` (CenterNet, FairMOT,
  CenterTrack, SMOKE, YOLACT++).

torchvision's ``DeformConv2d`` is :class:`deformcli.DeformConv2d` itself.
"""
