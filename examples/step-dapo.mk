# Step-level DAPO (Direct Advantage Policy Optimization, Skywork, arXiv 2412.18279;
# ALGORITHMS.md Part D §3; not ByteDance's DAPO) as a small offline pipeline:
#   1. gen-pairs: N completions per prompt from the policy MODEL (the SFT model);
#   2. score -s mc-rollout:MODEL: split each completion into steps at a blank line and
#      estimate v(s_k) = mean --verifier score of ROLLOUTS continuations from every step
#      prefix (writes mc_rollout.step_values / outcome on each completion);
#   3. train-rm --method prm: the critic, a PRM fitted to those Monte-Carlo values (soft
#      BCE labels: step k's label is the value of the state after it);
#   4. train-policy --method step-dapo --critic: fit the actor to the step advantages
#      A_k = v(s_k+1) - v(s_k), v from the critic, with the quadratic loss
#      (beta*log-ratio - A_k)^2. Actor and critic are trained apart, as in the paper.
#
#   make -f examples/step-dapo.mk            SmolLM2-135M-Instruct (CPU: tens of minutes)
#   make -f examples/step-dapo.mk tiny       a random tiny Llama (a smoke run, ~1 min)
#   make -f examples/step-dapo.mk ROLLOUTS=4 BETA=0.05 OUT=dapo-2
#
# Variables: MODEL (policy and rollout model), PROMPTS (prompts with meta.checks for the
# rules verifier), NPROMPTS, N (completions per prompt), ROLLOUTS (M), MAXNEW (new tokens
# of completions and rollouts), VERIFIER (scorer spec), BETA, STEPS, BATCH, LR, OUT.
# Output: $(OUT)/samples.jsonl, $(OUT)/mc.jsonl, the critic $(OUT)/critic and the
# policy folder $(OUT)/policy.
# Run from the repository root (paths are relative to it).
ALIGNKIT ?= alignkit
OUT      ?= step-dapo
MODEL    ?= smollm2-135m-instruct
PROMPTS  ?= examples/data/train.jsonl
NPROMPTS ?= 16
N        ?= 2
ROLLOUTS ?= 8
MAXNEW   ?= 64
VERIFIER ?= rules
BETA     ?= 0.1
STEPS    ?= 20
BATCH    ?= 4
LR       ?= 1e-6

.PHONY: all tiny
all: $(OUT)/policy/alignkit.json

tiny:
	$(MAKE) -f examples/step-dapo.mk all OUT=$(if $(filter step-dapo,$(OUT)),step-dapo-tiny,$(OUT)) \
	  MODEL=tiny-llama NPROMPTS=4 N=2 ROLLOUTS=2 MAXNEW=12 STEPS=2 BATCH=2 LR=1e-3

$(OUT)/prompts.jsonl: $(PROMPTS)
	@mkdir -p $(@D)
	head -n $(NPROMPTS) $< > $@

$(OUT)/samples.jsonl: $(OUT)/prompts.jsonl
	$(ALIGNKIT) gen-pairs --model $(MODEL) -n $(N) --max-new-tokens $(MAXNEW) --seed 0 $< -o $@

$(OUT)/mc.jsonl: $(OUT)/samples.jsonl
	$(ALIGNKIT) score -s mc-rollout:$(MODEL) --verifier $(VERIFIER) --rollouts $(ROLLOUTS) \
	  --rollout-max-new-tokens $(MAXNEW) --rollout-seed 0 $< -o $@

$(OUT)/critic/alignkit.json: $(OUT)/mc.jsonl
	$(ALIGNKIT) train-rm --method prm --model $(MODEL) $< --max-steps $(STEPS) \
	  --batch-size $(BATCH) --eval-split 0 --seed 0 -o $(OUT)/critic --force

$(OUT)/policy/alignkit.json: $(OUT)/mc.jsonl $(OUT)/critic/alignkit.json
	$(ALIGNKIT) train-policy --method step-dapo --model $(MODEL) $< --critic $(OUT)/critic \
	  --beta $(BETA) \
	  --max-steps $(STEPS) --batch-size $(BATCH) --lr $(LR) --seed 0 -o $(OUT)/policy --force
