from .dicom_output import SaveDicomSegSRd
from .fpi import ForeignPatchInterpolationd, RandForeignPatchInterpolation, RandForeignPatchInterpolationd
from .io import BadImageError, LoadGrayscaleImaged, load_grayscale
from .mixed_meta import DecodeMixedMetad, collate_mixed_meta
from .preprocessing import preprocessing
from .saving import SaveHeatmapd
from .scoring import AnomalyScored, anomaly_map, anomaly_score, score_columns
