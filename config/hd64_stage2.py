# head_dim-64 ladder, stage 2: head_dim 64 -> 128 (exact: grow.py), 16 layers, 8 heads of 128 (d=1024),
# FFN 2816, vocabulary 8192. Doubling head_dim at fixed heads doubles d, so this stage is ~4x stage 1;
# it is stage3.py's shape at the smaller vocabulary, so the ladder goes on with
#   train.py config/stage3.py --grow_from=out/hd64_stage2/ckpt.pt --out_dir=out/hd64_stage3
out_dir = "out/hd64_stage2"
init_from = "grow"
grow_from = "out/hd64_stage1/ckpt.pt"
data_dir = "data/gutenberg/llama2_v8192"
vocab_size = 8192
n_layer, n_head, head_dim, ffn_hidden, block_size = 16, 8, 128, 2816, 2048
batch_size, grad_accum_steps = 32, 8  # 0.5M tokens per iteration on 8 GPUs or 1 (accumulating); micro-batch 32: fewer launches per token (README, Speed)
max_iters = 2000
learning_rate, min_lr, warmup_iters = 6e-04, 6e-05, 100  # WSD: warm up, then hold
lr_mult = 2.0  # the new generation at twice the old ones' peak (part of the study's best recipe)
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
