"""Random, family-friendly names: rooms are "Adjective Noun", members "Color Noun"."""

from __future__ import annotations

import random

ADJECTIVES = """
Able Agile Amber Ancient Autumn Bold Brave Breezy Bright Brisk Bubbly Busy Calm Candid
Careful Cheerful Chilly Clever Cloudy Cosy Crafty Crisp Curious Dapper Daring Dashing
Dazzling Eager Early Earnest Easy Electric Elegant Epic Fabled Fair Fancy Fearless Festive
Fluffy Fond Friendly Frosty Gentle Giant Gifted Glad Gleaming Glowing Golden Graceful Grand
Happy Hardy Hearty Helpful Heroic Honest Hopeful Humble Jolly Jovial Joyful Keen Kind Lively
Lucky Lunar Magic Majestic Merry Mighty Mellow Misty Modest Nimble Noble Patient Peaceful
Perfect Playful Plucky Polite Proud Quick Quiet Radiant Rapid Rustic Shiny Silent Silky Sleepy
Smart Snowy Sparkling Speedy Spirited Splendid Steady Sunny Swift Tidy Tranquil Trusty Vivid
Warm Whimsical Wild Wise Witty Wonderful Zesty
""".split()

COLORS = """
Amber Apricot Aqua Azure Beige Black Blue Bronze Brown Cerise Coral Cream Crimson Cyan
Emerald Fuchsia Gold Gray Green Indigo Ivory Jade Khaki Lavender Lemon Lilac Lime Magenta
Maroon Mint Navy Ochre Olive Orange Peach Pink Plum Purple Red Rose Ruby Saffron Salmon
Sapphire Scarlet Silver Tan Teal Turquoise Violet White Yellow
""".split()

NOUNS = """
Acorn Albatross Anchor Antelope Apple Armadillo Badger Balloon Banjo Beacon Bear Beaver
Bee Beetle Bicycle Bison Blossom Boat Bramble Breeze Brook Bubble Buffalo Butterfly Cactus
Camel Canoe Canyon Cardinal Castle Cat Cedar Cheetah Cherry Chipmunk Cloud Clover Comet
Compass Cookie Coral Cougar Coyote Crane Cricket Crow Cupcake Daisy Deer Dolphin Dove
Dragonfly Drum Duck Eagle Elk Falcon Feather Fern Ferret Finch Firefly Flamingo Forest Fox
Frog Garden Gazelle Gecko Giraffe Glacier Goose Harbor Hare Hawk Hedgehog Heron Hill Hippo
Horizon Hummingbird Iguana Island Jaguar Jay Kangaroo Kettle Kite Kiwi Koala Lagoon Lantern
Lark Lemur Leopard Lighthouse Lily Lion Llama Lobster Lynx Magpie Maple Marmot Meadow Meerkat
Meteor Mole Moon Moose Moth Mountain Narwhal Nebula Newt Oak Ocean Octopus Orchid Osprey
Otter Owl Panda Panther Parrot Peacock Pebble Pelican Penguin Pepper Pine Planet Pony Poppy
Puffin Quail Rabbit Raccoon Raven River Robin Rocket Sailboat Salmon Seal Seat Shark Sparrow
Squirrel Starfish Stork Swan Teapot Thistle Tiger Toucan Tulip Turtle Valley Violin Walrus
Whale Willow Wolf Wombat Wren Yak Zebra
""".split()


def room_name(rng: random.Random | None = None) -> str:
    return _pick(ADJECTIVES, rng)


def member_name(rng: random.Random | None = None) -> str:
    return _pick(COLORS, rng)


def _pick(first_words: list[str], rng: random.Random | None) -> str:
    chooser = rng or _system_random
    return f"{chooser.choice(first_words)} {chooser.choice(NOUNS)}"


_system_random = random.SystemRandom()
