from .cuda_graphs import CUDAGraphIterations
from .evaluation import SelectionEvaluator
from .inferer import AutocastInferer
from .resumable import ResumablePassSampler, random_states, set_random_states
from .trainer import SAGANPrepareBatch, SAGANTrainer, attach_handlers, epochs_for, loss_terms
from .training_logs import TrainingLogs
