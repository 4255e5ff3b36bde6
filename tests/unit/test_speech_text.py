"""Speech text handling: spoken forms for domain models, ARPA building, sentences, phonemes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pocketsphinx import Decoder

from llmos.crypto import AtRest
from llmos.spoken import number_words, spoken_words
from llmos.utterances import UtteranceChunker, split_for_speech, split_sentences
from services.speech.domain import DomainCorpus, build_arpa, general_unigrams, spoken_sentences
from services.speech.tts import kokoro_phonemes

pytestmark = pytest.mark.unit

# Sealing is tested in tests/security/test_speech_corpus.py; these tests are about the models.
PLAINTEXT = AtRest(None, "speech corpus")


@pytest.mark.parametrize(
    ("value", "words"),
    [(0, "zero"), (14, "fourteen"), (40, "forty"), (105, "one hundred five"), (1450, "one thousand four hundred fifty"),
     (2_000_000, "two million")],
)
def test_numbers_are_spelled_out(value: int, words: str) -> None:
    assert " ".join(number_words(value)) == words


def test_spoken_words_read_text_as_a_person_would() -> None:
    assert spoken_words("Refunds take 14 days; 3% of 1,250.5 EUR & more.") == (
        "refunds take fourteen days three percent of one thousand two hundred fifty point five eur and more".split()
    )
    assert spoken_words("Call 0800 now, it's free") == "call zero eight zero zero now it's free".split()
    assert spoken_sentences("First one. Second one!\n\nThird") == ["first one", "second one", "third"]


def test_domain_model_is_an_arpa_trigram_of_the_text(tmp_path: Path) -> None:
    arpa = build_arpa(["where is my parcel", "where is my refund"])
    assert "\\data\\" in arpa and "ngram 3=" in arpa and "\\end\\" in arpa
    assert " parcel" in arpa and " refund" in arpa
    corpus = DomainCorpus(tmp_path, PLAINTEXT)
    assert corpus.build("acme") is None
    assert corpus.put("acme", "doc-1", "Where is my parcel? It ships in 2 days.")
    assert not corpus.put("acme", "doc-1", "Where is my parcel? It ships in 2 days.")
    path = corpus.build("acme")
    assert path is not None and "two" in path.read_text()
    assert corpus.sentences("globex") == []
    assert corpus.remove("acme", "doc-1") and corpus.build("acme") is None and corpus.model_path("acme") is None


def unigrams(arpa: str) -> dict[str, float]:
    section = arpa.split("\\1-grams:")[1].split("\\2-grams:")[0]
    return {fields[1]: 10 ** float(fields[0]) for fields in map(str.split, section.strip().splitlines())}


def test_the_general_model_keeps_every_word_reachable_without_drowning_the_domain(tmp_path: Path) -> None:
    background = {word: math.log10(p) for word, p in {"the": 0.6, "dryer": 0.1, "parcel": 0.3}.items()}  # sums to 1
    domain_only = unigrams(build_arpa(["where is my parcel", "where is my refund"]))
    mixed_arpa = build_arpa(["where is my parcel", "where is my refund"], background, domain_weight=0.9)
    mixed = unigrams(mixed_arpa)
    assert "dryer" not in domain_only and mixed["dryer"] > 0
    assert set(mixed) == set(domain_only) | set(background)
    assert abs(sum(mixed.values()) - sum(domain_only.values())) < 1e-3  # the same total mass, shared out
    assert mixed["refund"] < domain_only["refund"] and mixed["parcel"] > 0.9 * domain_only["parcel"]
    assert "where is my" in mixed_arpa  # the domain's trigrams are untouched
    corpus = DomainCorpus(tmp_path, PLAINTEXT, background=background, domain_weight=0.9)
    corpus.put("acme", "doc-1", "Where is my parcel?")
    path = corpus.build("acme")
    assert path is not None and " dryer " in path.read_text()
    assert DomainCorpus(tmp_path, PLAINTEXT).model_path("acme") is None  # built with another recipe: rebuilt, not used


def test_general_unigrams_come_from_the_pocketsphinx_model() -> None:
    decoder = Decoder(loglevel="FATAL")
    general = general_unigrams(decoder, decoder.current_search())
    assert len(general) > 50_000 and general["the"] > general["dryer"] > -9


def test_sentences_are_split_for_streaming() -> None:
    assert split_sentences("Hello there. How are you?  Fine!\n\nBye") == ["Hello there.", "How are you?", "Fine!", "Bye"]
    # Spoken streams start with the first clause, when it has a few words, so audio starts sooner.
    assert split_for_speech("Gift cards are valid for three years, from the day of purchase. Keep the code.") == [
        "Gift cards are valid for three years,", "from the day of purchase.", "Keep the code."
    ]
    assert split_for_speech("Yes, it ships today, by courier.") == ["Yes, it ships today,", "by courier."]
    assert split_for_speech("Refunds take **14 days** [1]. See [2].") == ["Refunds take 14 days.", "See."]


def test_streamed_answer_is_cut_into_pieces_as_soon_as_each_is_complete() -> None:
    chunker = UtteranceChunker()
    deltas = ["Standard del", "ivery takes 3", ".5 days, and", " express one day. It", " is free", " over 50 euros."]
    pieces = [chunker.feed(delta) for delta in deltas]
    # "3" + ".5" is not a sentence end; each piece leaves as soon as the whitespace after it arrives.
    assert pieces == [[], [], ["Standard delivery takes 3.5 days,"], ["and express one day."], [], []]
    assert chunker.flush() == ["It is free over 50 euros."]
    assert chunker.flush() == []


def test_espeak_ipa_maps_to_kokoro_phonemes() -> None:
    # "how long", "my", "page": diphthongs become misaki's single letters, length marks go.
    assert kokoro_phonemes(["haʊ lˈɔːŋ", "maɪ pˈeɪdʒ"], "?") == "hW lˈɔŋ, mI pˈAʤ?"
