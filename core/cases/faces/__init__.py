"""The faces case (DESIGN §9, issue 12): scikit-image's LFW subset, the pretrained MTCNN O-Net
(weights read from the facenet-pytorch wheel, the package never imported), a Clever-Hans watermark
as the region, and adversarial patches with their detection (``core.stages.detection``).

- ``onet``: :class:`FaceDetector` (class 0 = "face", 1 = "non-face"; layers ``onet.conv1`` …
  ``onet.dense5``), :func:`pretrained_detector` (the models' factory), :func:`onet_weights_path`.
- ``adapter``: :func:`faces_data` (the data adapter), :func:`check_dataset` (the ``[dataset]``
  table), :func:`landmark_mass` (attribution near O-Net's own landmarks against chance).
"""

from .adapter import check_dataset, faces_data, landmark_mass
from .onet import CLASS_NAMES, LAYERS, FaceDetector, onet_weights_path, pretrained_detector

__all__ = ["CLASS_NAMES", "LAYERS", "FaceDetector", "check_dataset", "faces_data", "landmark_mass",
           "onet_weights_path", "pretrained_detector"]
