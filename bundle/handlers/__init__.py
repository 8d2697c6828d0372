from .checkpoint import AtomicCheckpointSaver, latest_checkpoint, resume_checkpoint
from .critic_stall import CriticStallDetector, RestartCritic
from .evaluation_report import EvaluationReportHandler, VolumeLevelMetrics, precision_recall_curve, roc_curve
from .model_loader import GeneratorLoader
from .operating_point import OperatingPointHandler
from .tensorboard_images import RestorationImageHandler
from .time_limit import TrainingTimeLimit
from .volume_aggregator import VolumeAggregator
