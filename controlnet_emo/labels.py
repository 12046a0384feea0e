"""AffectNet's expression classes, in label order: one definition for data, models and reports.

EmoNet's 8-class head uses this order too; its 5-class head keeps the first five.
"""

EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
# The same classes as adjectives, which read naturally in captions ("a photo of a {expression} face").
EXPRESSION_WORDS = (
    "neutral",
    "happy",
    "sad",
    "surprised",
    "fearful",
    "disgusted",
    "angry",
    "contemptuous",
)
