from .fpi import ForeignPatchInterpolationd
from .io import BadImageError, LoadGrayscaleImaged, load_grayscale
from .scoring import AnomalyScored, anomaly_map, anomaly_score
from .saving import SaveHeatmapd
