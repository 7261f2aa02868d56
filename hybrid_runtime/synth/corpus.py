"""A few paragraphs of plain English; the synthetic tokenizer learns its BPE merges from them."""

CORPUS = """\
Once upon a time, in a small town at the edge of a wide river, there lived an old clockmaker
who repaired every clock that anyone brought to his shop. The people of the town said that he
could hear the time itself, the way a musician hears a song. When the church bell rang a little
late, they came to him, and when the school clock ran a little fast, they came to him again.
He never asked for much money. He asked only that each clock be wound every morning, because a
clock that is not wound forgets what time it is, and a town that forgets the time forgets
itself.

One winter the river froze from one bank to the other, and the children of the town walked
across the ice to the forest on the far side. They found a house there that nobody had seen
before. Its windows were dark, its door was open, and inside it there were hundreds of clocks,
all of them stopped at the same minute. The children ran back across the ice and told the old
clockmaker what they had found. He put on his heavy coat, took his small bag of tools, and
followed them into the forest without saying a word.

The machine learning model reads the text one token at a time. Each token is a small piece of
a word, a whole word, or a single byte when nothing better is known. The model turns every
token into a vector of numbers, mixes the vectors with attention, and passes them through many
layers of experts. A router chooses which experts should work on each token; only a few of
them are active at once, so a very large model can still answer quickly. The answer is written
one token after another, and each new token depends on all of the tokens that came before it.

Memory is the real limit of such a system. The weights of the experts are stored in the main
memory of the computer, while the attention layers and the shared expert run on the graphics
card. Every step of decoding reads the selected experts from memory, so the speed of the
program is bounded by the bandwidth of the memory system. Good software keeps every core busy,
keeps the data close to the core that uses it, and never copies a byte twice when once will do.

The weather today is cold and bright. There is snow on the roofs and on the branches of the
trees, and the sky is a clear, pale blue. People walk slowly on the icy streets, holding their
hands in their pockets and their faces in their scarves. In the afternoon the sun will be low
and the shadows long; in the evening the lights of the houses will shine in the windows, and
the smell of bread and soup will drift along the road. Tomorrow it may be warmer, or it may
snow again; nobody knows for certain, and that is part of the charm of winter.

Questions and answers: What is the capital of France? The capital of France is Paris. How many
days are there in a week? There are seven days in a week. Which number comes after forty two?
The number forty three comes after forty two. Can you write a short poem about the sea? The sea
is deep and the sea is wide, the moon pulls gently on the tide. Please call the function that
returns the weather for a city, and then tell me whether I should take an umbrella with me.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}
{"role": "assistant", "content": "The weather in Berlin is 12 degrees and cloudy."}

The clockmaker opened the door of the strange house and listened. At first he heard nothing at
all; then, very quietly, he heard a single clock begin to tick. He smiled, because he knew
that one working clock is enough to teach all the others. He wound it carefully, set it to
the right time, and sat down on a wooden chair to wait. By morning every clock in the house
was ticking, and the ice on the river had begun to melt. The children said later that the
spring came early that year, and the old man only laughed and said that spring had simply
remembered what time it was.
"""
