"""The paper's 144 tasks and their 107 train / 37 test split, in one editable place.

R1-Code-Interpreter trains on 107 tasks of SymBench (33), BIG-Bench-Hard (27) and reasoning-gym (84)
and tests on 37. The paper's official test list is not available here: TEST_TASKS is a
reconstruction that spans the sources in proportion and keeps near-duplicate tasks together (game24 /
puzzle24 / countdown, sudokus, queens, letter counting, word sorting, string synthesis), so a test
task is never trained on under another name. GYM_84 is likewise reconstructed: reasoning-gym 0.1.25
less 22 datasets (meta, ARC-style and code I/O prompts, no single gold answer, slow generators).
Variant SymBench folders follow their base task; symbench:path_plan has no data in this copy.
"""
from __future__ import annotations

SYMBENCH_33 = """
    number_multiply new_operator pooling light_puzzles mahjong_pattern statistical_counting matrix_transformation
    pattern_recognition string_insertion string_deletion_and_modification string_synthesis reversi string_splitting
    synthesis_decomposition 2048 game24 path_plan letters boxlift boxnet blocksworld logical_equation logic_puzzle
    constrained_linear_arrangement letter_logic_diagram standard_sudoku eight_queens cryptanalysis
    combinatorial_calculation permutations_and_combinations gsm_hard math_geometry math_counting_and_probability
""".split()

SYMBENCH_VARIANTS = {
    "number_multiply_varied": "number_multiply", "game24_varied": "game24", "boxlift_sft": "boxlift",
    "boxnet_sft": "boxnet", "eight_queens_2": "eight_queens", "eight_queens_hard": "eight_queens",
    "eight_queens_varied": "eight_queens", "combinatorial_calculation_varied": "combinatorial_calculation",
}

BBH_27 = """
    boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages formal_fallacies
    geometric_shapes hyperbaton logical_deduction_five_objects logical_deduction_seven_objects
    logical_deduction_three_objects movie_recommendation multistep_arithmetic_two navigate object_counting
    penguins_in_a_table reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks
    sports_understanding temporal_sequences tracking_shuffled_objects_five_objects
    tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies word_sorting
""".split()

GYM_84 = """
    ab acre aiw base_conversion basic_arithmetic bf binary_alternation binary_matrix bitwise_arithmetic
    caesar_cipher calendar_arithmetic chain_sum circuit_logic coin_flip complex_arithmetic count_bits count_primes
    countdown course_schedule cryptarithm decimal_arithmetic decimal_chain_sum dice family_relationships
    fraction_simplification futoshiki game_of_life gcd group_anagrams gsm_symbolic isomorphic_strings jugs kakurasu
    knights_knaves largest_island lcm leg_counting letter_counting letter_jumble mahjong_puzzle manipulate_matrix
    maze mini_sudoku modulo_grid n_queens number_filtering number_format number_sequence number_sorting
    palindrome_generation palindrome_partitioning polynomial_equations polynomial_multiplication pool_matrix
    power_function prime_factorization products puzzle24 quantum_lock ransom_note rotate_matrix rotten_oranges
    self_reference sentence_reordering shortest_path simple_equations simple_geometry simple_integration sokoban
    spell_backward spiral_matrix string_insertion string_manipulation string_splitting string_synthesis sudoku survo
    syllogism time_intervals tower_of_hanoi word_ladder word_sequence_reversal word_sorting zebra_puzzles
""".split()

ALL_TASKS = ([f"symbench:{t}" for t in SYMBENCH_33] + [f"bbh:{t}" for t in BBH_27]
             + [f"gym:{t}" for t in GYM_84])

# Reconstructed 37 test tasks, as "source:name" (see the module docstring): 9 + 7 + 21.
TEST_TASKS = """
    symbench:game24 symbench:path_plan symbench:letters symbench:blocksworld symbench:logical_equation
    symbench:eight_queens symbench:standard_sudoku symbench:string_synthesis symbench:cryptanalysis
    bbh:navigate bbh:web_of_lies bbh:date_understanding bbh:logical_deduction_seven_objects bbh:dyck_languages
    bbh:word_sorting bbh:multistep_arithmetic_two
    gym:countdown gym:puzzle24 gym:letter_counting gym:n_queens gym:sudoku gym:mini_sudoku gym:string_synthesis
    gym:word_sorting gym:base_conversion gym:calendar_arithmetic gym:cryptarithm gym:family_relationships
    gym:futoshiki gym:knights_knaves gym:maze gym:polynomial_equations gym:prime_factorization gym:shortest_path
    gym:tower_of_hanoi gym:word_ladder gym:zebra_puzzles
""".split()

TRAIN_TASKS = [t for t in ALL_TASKS if t not in TEST_TASKS]


def split_of(task: str) -> str | None:
    """"train" or "test" for one of the paper's tasks (or a SymBench variant folder); None otherwise."""
    source, _, name = task.partition(":")
    if source == "symbench":
        task = f"symbench:{SYMBENCH_VARIANTS.get(name, name)}"
    if task in TEST_TASKS:
        return "test"
    return "train" if task in ALL_TASKS else None
