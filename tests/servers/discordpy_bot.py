"""
A discord.py bot pointed at the fake Discord (run as a subprocess by tests/test_discord_fake.py):
it prints one JSON line per thing it saw, replies to every message ("a button please" with a
message carrying a Stop button), answers every slash command with a deferred ephemeral
response, an edit of it and one follow-up, and a click of the button with a deferred
ephemeral response, an edit of it, and the button removed.

    python -m tests.servers.discordpy_bot API_BASE GATEWAY_URL TOKEN
"""

import json
import sys

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route


def say(**fields):
    print(json.dumps(fields), flush=True)


def main(api_base: str, gateway_url: str, token: str) -> None:
    Route.BASE = api_base  # discord.py's documented-in-source redirection hooks (§5.1)
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url + "/")
    intents = discord.Intents.default()
    intents.message_content = True
    client = discord.Client(intents=intents)

    @client.event
    async def on_ready():
        say(event="ready", user=str(client.user.id),
            guilds=[str(g.id) for g in client.guilds],
            channels=sorted(c.name for g in client.guilds for c in g.text_channels))

    @client.event
    async def on_resumed():
        say(event="resumed")

    class StopView(discord.ui.View):
        @discord.ui.button(label="Stop", style=discord.ButtonStyle.danger,
                           custom_id="hermes:stop")
        async def stop_clicked(self, interaction, button):
            say(event="clicked", custom_id=button.custom_id, user=str(interaction.user.id))
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.edit_original_response(content="stopped")
            await interaction.message.edit(view=None)
            say(event="click_done")

    @client.event
    async def on_message(message):
        if message.author == client.user:
            return
        say(event="message", content=message.content,
            guild=str(message.guild.id) if message.guild else None,
            channel=type(message.channel).__name__)
        if message.content == "a button please":
            sent = await message.channel.send("working", view=StopView(timeout=None))
        else:
            sent = await message.channel.send(f"pong: {message.content}", reference=message)
        say(event="sent", id=str(sent.id))

    @client.event
    async def on_interaction(interaction):
        if interaction.type != discord.InteractionType.application_command:
            return  # components go to their view
        say(event="interaction", name=interaction.data["name"])
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.edit_original_response(content="done")
        await interaction.followup.send("more", ephemeral=True)
        say(event="interaction_done")

    client.run(token, log_handler=None)


if __name__ == "__main__":
    main(*sys.argv[1:4])
