# The Policy Cliff (arXiv 2507.20150; ALGORITHMS.md Part D §10) as a small experiment:
# train two GRPO runs whose rewards differ only by a small seeded perturbation
# (examples/policy_cliff_reward.py: -len/40 + NOISE * u(SEED, prompt, completion)), then
# measure how far apart the two policies end up with `alignkit eval` (KL(a || b) on
# held-out prompts). Do it without and with the entropy bonus (--entropy-coef): the
# paper proves entropy regularisation makes the reward -> policy map continuous, so the
# KL between the two runs should shrink as ENT grows.
#
#   make -f examples/policy-cliff.mk            SmolLM2-135M-Instruct (CPU: tens of minutes)
#   make -f examples/policy-cliff.mk tiny       a random tiny Llama (a smoke run, ~1 min)
#   make -f examples/policy-cliff.mk ENT=0.01 NOISE=0.02 STEPS=100 OUT=cliff-2
#
# Output: $(OUT)/ent-E/seed-S/ (the trained policies), $(OUT)/kl-ent-E.json (the eval
# reports: comparisons.model.kl.k3_mean is KL(seed 1 || seed 2)) and a summary line per
# ENT value on stdout. Run from the repository root (paths are relative to it).
ALIGNKIT ?= alignkit
PYTHON   ?= python3
OUT      ?= cliff
MODEL    ?= smollm2-135m-instruct
PROMPTS  ?= examples/data/train.jsonl
HELDOUT  ?= examples/data/eval.jsonl
NPROMPTS ?= 64
NEVAL    ?= 32
STEPS    ?= 40
BATCH    ?= 8
LR       ?= 1e-5
MAXNEW   ?= 48
NOISE    ?= 0.05
# the entropy coefficients compared (0 = no bonus)
ENTS     ?= 0 0.01
REWARD   := python:examples/policy_cliff_reward.py:noisy

.PHONY: all tiny
all: $(foreach e,$(ENTS),$(OUT)/kl-ent-$(e).json)
	@for e in $(ENTS); do $(PYTHON) -c "import json,sys; r=json.load(open(sys.argv[1])); \
	  k=r['comparisons']['model']['kl']; print('entropy-coef', sys.argv[2], 'KL(seed1||seed2) k3 =', \
	  round(k['k3_mean'], 4), '+-', round(k['k3_se'], 4))" $(OUT)/kl-ent-$$e.json $$e; done

tiny:
	$(MAKE) -f examples/policy-cliff.mk all OUT=$(if $(filter cliff,$(OUT)),cliff-tiny,$(OUT)) \
	  MODEL=tiny-llama NPROMPTS=16 NEVAL=8 STEPS=4 MAXNEW=12 LR=1e-2

$(OUT)/prompts.jsonl: $(PROMPTS)
	@mkdir -p $(@D)
	head -n $(NPROMPTS) $< > $@
$(OUT)/heldout.jsonl: $(HELDOUT)
	@mkdir -p $(@D)
	head -n $(NEVAL) $< > $@

# one training run per (entropy coefficient, noise seed)
define run
$(OUT)/ent-$(1)/seed-$(2)/alignkit.json: $(OUT)/prompts.jsonl
	POLICY_CLIFF_NOISE=$(NOISE) POLICY_CLIFF_SEED=$(2) $(ALIGNKIT) train-policy --method grpo \
	  --model $(MODEL) $$< --reward $(REWARD) --entropy-coef $(1) --max-steps $(STEPS) \
	  --batch-size $(BATCH) --lr $(LR) --max-new-tokens $(MAXNEW) --seed 0 \
	  -o $(OUT)/ent-$(1)/seed-$(2) --force
endef
$(foreach e,$(ENTS),$(foreach s,1 2,$(eval $(call run,$(e),$(s)))))

# KL(seed 1 || seed 2) at temperature 1 on the held-out prompts
$(OUT)/kl-ent-%.json: $(OUT)/ent-%/seed-1/alignkit.json $(OUT)/ent-%/seed-2/alignkit.json $(OUT)/heldout.jsonl
	POLICY_CLIFF_NOISE=0 $(ALIGNKIT) eval --model $(OUT)/ent-$*/seed-1 --baseline $(OUT)/ent-$*/seed-2 \
	  $(OUT)/heldout.jsonl --scorer $(REWARD) --max-new-tokens $(MAXNEW) > $@.tmp && mv $@.tmp $@
