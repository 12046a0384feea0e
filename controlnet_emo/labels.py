"""Names shared by every stage: AffectNet's expression classes in label order, and the
condition maps' metadata columns. One definition for prepare, data, models and reports.

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

# condition name -> the prepared dataset's metadata column naming its map: what prepare writes
# and the training loader reads (DESIGN.md, "Prepared dataset folder").
CONDITION_KEYS = {
    "flame": "flame_file_name",
    "depth": "depth_file_name",
    "skeleton": "skeleton_file_name",
}
