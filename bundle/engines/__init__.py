from .trainer import SAGANPrepareBatch, SAGANTrainer, attach_handlers, epochs_for, loss_terms
