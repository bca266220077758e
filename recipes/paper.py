"""Vendrov et al. (ICLR 2016), order-embeddings as the paper trained them: the contrastive loss
summed over every negative of the batch throughout, Adam at 1e-3 without decay, 15 epochs,
no dropout; the paper stopped early on validation, which best.pt keeps.

    python train.py recipes/paper.py --dataset=coco
"""
measure = 'order'
margin = 0.05
max_violation = False
warmup_epochs = 0
embed_dim = 1024
word_dim = 300
batch_size = 128
learning_rate = 1e-3
lr_decay_epoch = 0
grad_clip = 2.0
epochs = 15
word_dropout = 0.0
image_dropout = 0.0
