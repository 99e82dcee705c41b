"""The synthetic world the experiments live in: a 128-token vocabulary, two text corpora
for pre-training hosts, and two classification tasks. Everything is drawn from seeded
``torch.Generator`` objects, so a seed fixes every example.

Vocabulary (ids):

* 0 PAD, 1 BOS, 2 SEP (end of a task's input), 3 TASK_SENT and 4 TASK_TOPIC (which task a
  prompt asks for), 5 POS / 6 NEG (the sentiment task's answers), 7 YES / 8 NO (the topic
  task's answers);
* 16-23: the eight *marked* tokens (the stand-in for toxic words in the unlearning
  experiment);
* 32-79: the words of domain 1 and 80-127 the words of domain 2 (48 each). In each domain,
  8 words are positive, 8 negative, 8 "animals", 8 "tools" and 16 neutral.

Corpora (for pre-training the hosts and for the unlearning experiment):

* *corpus 1* is text from a first-order Markov chain over the 96 words: each word has 4
  possible successors (chosen at random, with Dirichlet(1) probabilities); a sequence is BOS
  and 31 tokens. With probability ``p_marked`` at each position a marked token (uniform over
  the eight) is emitted instead of a word, and the chain resumes from the last word.
* *corpus 2* (the "shifted" corpus) is the same construction with a different chain (other
  successors, other probabilities): the same words, different statistics.

Tasks (prompts are ``BOS TASK w1 ... w12 SEP`` and the answer is the next token):

* *sentiment*: twelve words of one domain, of which exactly three are polar (positive or
  negative); the label is the majority polarity (POS or NEG, balanced). The other nine are
  drawn from the domain's non-polar words (neutral, animals, tools).
* *topic*: twelve words of one domain (chosen uniformly), of which exactly three are animals
  or tools; the answer is YES when animals are the majority, NO otherwise (balanced). The
  other nine are the domain's non-topic words (neutral, positive, negative).

A prediction is the more likely of the task's two answer tokens (restricted argmax); a score
is the accuracy of these predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB = 128
PAD, BOS, SEP, TASK_SENT, TASK_TOPIC, POS, NEG, YES, NO = range(9)
MARKED = list(range(16, 24))
DOMAIN_WORDS = {1: list(range(32, 80)), 2: list(range(80, 128))}
WORDS = DOMAIN_WORDS[1] + DOMAIN_WORDS[2]
PROMPT_LEN = 15  # BOS TASK w1..w12 SEP
TEXT_WORDS = 12
KEY_WORDS = 3
LM_LEN = 32

TASKS = {
    "sentiment": {"prefix": TASK_SENT, "answers": (POS, NEG)},
    "topic": {"prefix": TASK_TOPIC, "answers": (YES, NO)},
}


def _split(words: list[int]) -> dict[str, list[int]]:
    return {
        "positive": words[0:8], "negative": words[8:16], "animal": words[16:24], "tool": words[24:32],
        "neutral": words[32:48],
    }


LEXICON = {d: _split(w) for d, w in DOMAIN_WORDS.items()}


@dataclass
class Batch:
    """Task prompts (N x PROMPT_LEN), the answer token of each, and the label index (0 is
    the first answer: POS or YES)."""

    inputs: torch.Tensor
    answers: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def cat(self, other: "Batch") -> "Batch":
        return Batch(torch.cat([self.inputs, other.inputs]), torch.cat([self.answers, other.answers]),
                     torch.cat([self.labels, other.labels]))

    def shuffled(self, generator: torch.Generator) -> "Batch":
        order = torch.randperm(len(self), generator=generator)
        return Batch(self.inputs[order], self.answers[order], self.labels[order])


def _pick(pool: list[int], k: int, g: torch.Generator) -> list[int]:
    return [pool[i] for i in torch.randint(len(pool), (k,), generator=g).tolist()]


def task_examples(task: str, n: int, g: torch.Generator, domains: tuple[int, ...] = (1, 2)) -> Batch:
    """``n`` examples of ``task`` whose words come from ``domains`` (one domain per example,
    uniformly), labels balanced."""
    spec = TASKS[task]
    first, second = ("positive", "negative") if task == "sentiment" else ("animal", "tool")
    inputs, labels = [], []
    for i in range(n):
        domain = domains[int(torch.randint(len(domains), (1,), generator=g))]
        lex = LEXICON[domain]
        fillers = [w for key, ws in lex.items() if key not in (first, second) for w in ws]
        label = i % 2  # balanced: 0 -> first answer, 1 -> second
        majority = 2 + int(torch.randint(2, (1,), generator=g))  # 2 or 3 of the 3 key words
        keys = _pick(lex[first if label == 0 else second], majority, g)
        keys += _pick(lex[second if label == 0 else first], KEY_WORDS - majority, g)
        words = keys + _pick(fillers, TEXT_WORDS - KEY_WORDS, g)
        order = torch.randperm(TEXT_WORDS, generator=g).tolist()
        inputs.append([BOS, spec["prefix"], *[words[j] for j in order], SEP])
        labels.append(label)
    labels_t = torch.tensor(labels)
    answers = torch.tensor(spec["answers"])[labels_t]
    return Batch(torch.tensor(inputs), answers, labels_t).shuffled(g)


class Corpus:
    """Documents from a per-domain Markov chain with document-level latents.

    A document picks a domain, a mood (positive or negative) and a topic (animals or tools),
    uniformly. Each next word is, with probability ``p_latent``, a word of the document's
    mood or topic set (uniform over the 16), and otherwise the Markov successor of the
    previous word: each of the domain's 48 words has 4 possible successors in its domain,
    chosen at random with Dirichlet(1) probabilities. So predicting the next word rewards
    inferring the mood and topic from the words seen so far, which is how the hosts come to
    represent them. With probability ``p_marked`` a position holds a marked token instead
    (uniform over the eight) and the document resumes after it.
    """

    def __init__(self, seed: int, p_latent: float = 0.3):
        g = torch.Generator().manual_seed(seed)
        self.p_latent = p_latent
        n = len(DOMAIN_WORDS[1])
        self.successors = {d: torch.tensor(ws)[torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(n)])]
                           for d, ws in DOMAIN_WORDS.items()}
        self.probs = {d: self._dirichlet(n, g) for d in DOMAIN_WORDS}

    @staticmethod
    def _dirichlet(n: int, g: torch.Generator) -> torch.Tensor:
        gamma = -torch.log(torch.rand((n, 4), generator=g).clamp_min(1e-12))  # Gamma(1) = Exp(1)
        return gamma / gamma.sum(1, keepdim=True)

    def sample(self, n: int, g: torch.Generator, p_marked: float = 0.0, length: int = LM_LEN) -> torch.Tensor:
        out = torch.empty((n, length), dtype=torch.long)
        out[:, 0] = BOS
        domain = torch.randint(1, 3, (n,), generator=g)
        mood = torch.randint(2, (n,), generator=g)
        topic = torch.randint(2, (n,), generator=g)
        latent_sets = torch.stack([
            torch.tensor(LEXICON[int(d)]["positive" if m == 0 else "negative"]
                         + LEXICON[int(d)]["animal" if t == 0 else "tool"])
            for d, m, t in zip(domain.tolist(), mood.tolist(), topic.tolist())
        ])
        first = torch.tensor(DOMAIN_WORDS[1][0])
        state = torch.randint(48, (n,), generator=g)  # index of the last word within its domain
        succ = torch.stack([self.successors[1], self.successors[2]])  # (2, 48, 4) token ids
        probs = torch.stack([self.probs[1], self.probs[2]])
        rows = torch.arange(n)
        for t in range(1, length):
            choice = torch.multinomial(probs[domain - 1, state], 1, generator=g).squeeze(1)
            chained = succ[domain - 1, state, choice]
            latent = latent_sets[rows, torch.randint(16, (n,), generator=g)]
            word = torch.where(torch.rand(n, generator=g) < self.p_latent, latent, chained)
            marked = torch.rand(n, generator=g) < p_marked
            token = torch.where(marked, torch.tensor(MARKED)[torch.randint(len(MARKED), (n,), generator=g)], word)
            out[:, t] = token
            state = torch.where(marked, state, (word - first) % 48)
        return out
