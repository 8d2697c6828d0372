from .trainer import SAGANTrainer, attach_handlers, loss_terms
