"""VSE++ (Faghri et al., BMVC 2018) on precomputed features: the cosine measure, the hardest
negative from the first step, margin 0.2, Adam at 2e-4 for 15 epochs then 2e-5 for 15 more,
no dropout.

    python train.py recipes/vsepp.py --dataset=coco
"""
measure = 'cosine'
margin = 0.2
max_violation = True
warmup_epochs = 0
embed_dim = 1024
word_dim = 300
batch_size = 128
learning_rate = 2e-4
lr_decay_epoch = 15
grad_clip = 2.0
epochs = 30
word_dropout = 0.0
image_dropout = 0.0
